"""Smoke tests of examples/: every script runs with --quick and says what it found.

The quick reproduction is also checked for the paper's orderings that hold at
its reduced size: Anti-PGD ends flatter (valley) and generalizes better
(sparse regression, matrix sensing) than GD, which beats PGD. Its MNIST-1D runs
are a few steps long: only their shape and sanity are checked. The MNIST-1D
validation split is checked directly, without training.
"""

import importlib.util
import json
import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
# Generous: the scripts take seconds on a quiet machine, but CI runners are shared.
TIMEOUT_S = 600


def _run(script: str, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


@pytest.fixture(scope="module")
def quick_reproduction(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    stdout = _run("reproduce_paper.py", "--out", str(out))
    return out, stdout, json.loads((out / "results.json").read_text())


MNIST1D_METHODS = {
    "mnist1d-large-batch": {"GD", "PGD", "Anti-PGD"},
    "mnist1d-sharp-start": {"start (GD converged)", "GD", "PGD", "Anti-PGD"},
    "mnist1d-minibatch": {"SGD", "SGD+independent", "Anti-SGD"},
}


def test_reproduction_writes_tables_and_figures(quick_reproduction):
    out, stdout, results = quick_reproduction
    assert set(results) == {
        "valley",
        "sparse_regression",
        "matrix_sensing",
        "digits",
        "mnist1d-large-batch",
        "mnist1d-sharp-start",
        "mnist1d-minibatch",
        "mnist1d-correlation",
    }
    for name in results:
        assert f"## {name}" in stdout
        assert (out / f"{name}.png").stat().st_size > 0
    assert (out / "digits_spectrum.png").stat().st_size > 0
    assert "| Anti-PGD |" in (out / "results.md").read_text()
    assert set(results["digits"]) == {
        "GD",
        "PGD",
        "Anti-PGD",
        "optax.noisy_sgd",
        "optax.contrib.sam",
    }


def test_reproduction_reports_spread_and_seeds(quick_reproduction):
    digits = quick_reproduction[2]["digits"]["Anti-PGD"]
    for metric in ("test accuracy %", "Tr H", "lambda_max"):
        per_seed = digits[f"{metric} per seed"]
        assert len(per_seed) >= 2
        assert digits[metric] == pytest.approx(np.mean(per_seed))
        assert digits[f"{metric} std"] == pytest.approx(np.std(per_seed))
    assert digits["lambda_max"] > 0


@pytest.mark.parametrize("experiment", sorted(MNIST1D_METHODS))
def test_mnist1d_reports_every_method_sanely(quick_reproduction, experiment):
    results = quick_reproduction[2][experiment]
    assert set(results) == MNIST1D_METHODS[experiment]
    for name, metrics in results.items():
        for split in ("test", "val"):
            assert 0 <= metrics[f"{split} accuracy %"] <= 100, (name, metrics)
        for metric in ("train loss", "Tr H", "Tr H s.e.", "logits RMS"):
            assert math.isfinite(metrics[metric]), (name, metric)
        assert metrics["Tr H s.e."] >= 0
        assert math.isfinite(metrics["lambda_max"])
        if "sigma" in metrics:  # a trained method: sigma chosen from its grid
            chosen = metrics[f"val accuracy % (sigma={metrics['sigma']:g})"]
            assert chosen == pytest.approx(metrics["val accuracy %"])
            grid = [v for k, v in metrics.items() if k.startswith("val accuracy % (")]
            assert chosen == max(grid)  # selected on validation accuracy


LAYERS = {
    "digits": ("hidden", "out"),
    **dict.fromkeys(MNIST1D_METHODS, ("conv1", "conv2", "conv3", "head")),
}


@pytest.mark.parametrize("experiment", sorted(LAYERS))
def test_layer_traces_are_reported_and_sum_to_the_trace_per_seed(
    quick_reproduction, experiment
):
    # The block traces use the probes of Tr H: per seed, the layers' traces
    # add up to it (to float32 rounding of a sum of 2 to 4 terms).
    for method, metrics in quick_reproduction[2][experiment].items():
        layers = [
            np.asarray(metrics[f"Tr H {layer} per seed"])
            for layer in LAYERS[experiment]
        ]
        total = np.asarray(metrics["Tr H per seed"])
        np.testing.assert_allclose(sum(layers), total, rtol=1e-5, err_msg=method)
        assert all(np.all(layer != 0) for layer in layers), method
    assert "Tr H by layer" in quick_reproduction[1]


def test_mnist1d_correlation_sweep_reports_its_points(quick_reproduction):
    out, stdout, results = quick_reproduction
    points = results["mnist1d-correlation"]
    assert "c=1, cyclic" in points
    assert any(point.startswith("c=") and "cyclic" not in point for point in points)
    assert any(point.startswith("H=") for point in points)
    for metrics in points.values():
        assert 0 <= metrics["test accuracy %"] <= 100
        assert math.isfinite(metrics["Tr H"])


@pytest.mark.parametrize(
    ("experiment", "metric"),
    [
        ("valley", "Tr H"),
        ("sparse_regression", "test error"),
        ("matrix_sensing", "relative test error"),
    ],
)
def test_anti_pgd_below_gd_below_pgd(quick_reproduction, experiment, metric):
    final = {name: m[metric] for name, m in quick_reproduction[2][experiment].items()}
    assert final["Anti-PGD"] < final["GD"] < final["PGD"], final


def test_digits_pgd_generalizes_worst(quick_reproduction):
    accuracy = {
        name: m["test accuracy %"]
        for name, m in quick_reproduction[2]["digits"].items()
    }
    assert accuracy["PGD"] < min(accuracy["GD"], accuracy["Anti-PGD"]), accuracy


def _import_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mnist1d_experiments():
    return _import_example("mnist1d_experiments")


@pytest.mark.parametrize("seed", [0, 1])
def test_validation_split_partitions_the_training_signals(mnist1d_experiments, seed):
    train, val = mnist1d_experiments.split_train_validation(4000, 1000, seed)
    assert len(train) == 3000 and len(val) == 1000
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(4000))
    again = mnist1d_experiments.split_train_validation(4000, 1000, seed)
    np.testing.assert_array_equal(again[1], val)  # deterministic


def test_validation_split_differs_between_seeds(mnist1d_experiments):
    split = mnist1d_experiments.split_train_validation
    assert not np.array_equal(split(4000, 1000, 0)[1], split(4000, 1000, 1)[1])


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.ascontiguousarray(x)}


def test_validation_is_disjoint_from_test_and_from_the_signals_steps_use(
    mnist1d_experiments,
):
    data = mnist1d_experiments.load()
    train, val, test = _rows(data.x_train), _rows(data.x_val), _rows(data.x_test)
    assert len(val) == len(data.x_val) == 1000  # no duplicate signals to hide behind
    assert not val & test
    assert not val & train
    # What the steps see: every batch the training loop draws, large and small.
    for batch_size, steps in ((1000, 9), (64, 200)):
        batches = mnist1d_experiments.batch_indices(
            0, len(data.y_train), batch_size, steps
        )
        assert batches.shape == (steps, batch_size)
        assert batches.min() >= 0 and batches.max() < len(data.y_train)
        seen = _rows(data.x_train[batches.ravel()])
        assert not seen & val
        assert not seen & test
        # An epoch is a permutation: no signal twice before every one is seen.
        per_epoch = len(data.y_train) // batch_size
        epoch = batches[:per_epoch].ravel()
        assert len(np.unique(epoch)) == epoch.size


def test_flax_nnx_example_runs():
    stdout = _run("flax_nnx.py")
    assert "denoised w_n - xi_n" in stdout


def test_flax_linen_example_runs():
    stdout = _run("flax_linen.py")
    assert "denoised" in stdout


def test_seeds_vmap_example_sweeps_agree_where_the_law_says_they_must():
    rows = dict(
        re.findall(r"^\| ([^|]+?) \| ([^|]+ \| [^|]+) \|$", _run("seeds_vmap.py"), re.M)
    )
    assert len(rows) == 3 + 3 + 5 + 4 + 1  # the settings, and the table's header
    # sigma = 0 is GD for both; c = 1 is Anti-PGD (the default); c = 0 and
    # H = 0.5 are both the filter (1, 0, ...): the same stream, the same runs.
    assert rows["PGD, sigma 0"] == rows["Anti-PGD, sigma 0"]
    assert rows["Anti-PGD, correlation 1"] == rows["Anti-PGD, sigma 0.05"]
    assert rows["Anti-PGD, correlation 0"] == rows["fractional, hurst 0.5"]
    error = lambda name: float(rows[name].split(" ± ")[0])  # noqa: E731
    assert (
        error("Anti-PGD, sigma 0.05") < error("PGD, sigma 0") < error("PGD, sigma 0.05")
    )
