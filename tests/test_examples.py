"""Smoke tests of examples/: every script runs with --quick and says what it found.

The quick reproduction is also checked for the paper's orderings that hold at
its reduced size: Anti-PGD ends flatter (valley) and generalizes better
(sparse regression, matrix sensing) than GD, which beats PGD. Its MNIST-1D and
MNIST runs are a few steps long: only their shape and sanity are checked. The
splits are checked directly, without training, and SAM's figures at equal
gradient evaluations against a run of half the steps.
"""

import dataclasses
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


# The main job, and one correlation sweep (the tasks share its code).
EXPERIMENTS = (
    "valley",
    "sparse_regression",
    "matrix_sensing",
    "digits",
    "mnist1d-large-batch",
    "mnist1d-sharp-start",
    "mnist1d-minibatch",
    "mnist-large-batch",
    "mnist-sharp-start",
    "mnist-minibatch",
    "mnist1d-correlation",
)


@pytest.fixture(scope="module")
def quick_reproduction(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    stdout = _run(
        "reproduce_paper.py", "--out", str(out), "--experiments", ",".join(EXPERIMENTS)
    )
    return out, stdout, json.loads((out / "results.json").read_text())


LARGE_BATCH = {"GD", "PGD", "Anti-PGD", "SAM", "SAM (equal gradients)"}
SHARP_START = {"start (GD converged)", "GD", "PGD", "Anti-PGD"}
MINIBATCH = {"SGD", "SGD+independent", "Anti-SGD", "SAM", "SAM (equal gradients)"}
TASK_METHODS = {
    f"{task}-{name}": methods
    for task in ("mnist1d", "mnist")
    for name, methods in (
        ("large-batch", LARGE_BATCH),
        ("sharp-start", SHARP_START),
        ("minibatch", MINIBATCH),
    )
}


def test_reproduction_writes_tables_and_figures(quick_reproduction):
    out, stdout, results = quick_reproduction
    assert set(results) == set(EXPERIMENTS)
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


@pytest.mark.parametrize("experiment", sorted(TASK_METHODS))
def test_tasks_report_every_method_sanely(quick_reproduction, experiment):
    results = quick_reproduction[2][experiment]
    assert set(results) == TASK_METHODS[experiment]
    for name, metrics in results.items():
        for split in ("test", "val"):
            assert 0 <= metrics[f"{split} accuracy %"] <= 100, (name, metrics)
        if name.endswith("(equal gradients)"):
            continue  # accuracies and the training loss only
        for metric in ("train loss", "Tr H", "Tr H s.e.", "logits RMS"):
            assert math.isfinite(metrics[metric]), (name, metric)
        assert metrics["Tr H s.e."] >= 0
        assert math.isfinite(metrics["lambda_max"])
        grid_name = "rho" if name == "SAM" else "sigma"
        if grid_name in metrics:  # a trained method: chosen from its grid
            chosen = metrics[f"val accuracy % ({grid_name}={metrics[grid_name]:g})"]
            assert chosen == pytest.approx(metrics["val accuracy %"])
            grid = [v for k, v in metrics.items() if k.startswith("val accuracy % (")]
            assert chosen == max(grid)  # selected on validation accuracy


@pytest.mark.parametrize(
    "experiment", sorted(e for e, methods in TASK_METHODS.items() if "SAM" in methods)
)
def test_sam_spends_two_gradients_per_step(quick_reproduction, experiment):
    results = quick_reproduction[2][experiment]
    baseline = results["GD" if "GD" in results else "SGD"]["gradient evaluations"]
    assert results["SAM"]["gradient evaluations"] == 2 * baseline
    assert "SAM (equal gradients)" in quick_reproduction[1]


LAYERS = {
    "digits": ("hidden", "out"),
    **{
        name: ("conv1", "conv2", "conv3", "head")
        for name in TASK_METHODS
        if name.startswith("mnist1d-")
    },
    **{
        name: ("conv1", "conv2", "hidden", "head")
        for name in TASK_METHODS
        if name.startswith("mnist-")
    },
}


@pytest.mark.parametrize("experiment", sorted(LAYERS))
def test_layer_traces_are_reported_and_sum_to_the_trace_per_seed(
    quick_reproduction, experiment
):
    # The block traces use the probes of Tr H: per seed, the layers' traces
    # add up to it (to float32 rounding of a sum of 2 to 4 terms).
    for method, metrics in quick_reproduction[2][experiment].items():
        if method.endswith("(equal gradients)"):
            continue  # no Hessian at the halfway point
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
def examples():
    """The task modules of examples/ (and their protocol, ``section4``)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return {
            name: _import_example(name)
            for name in ("section4", "mnist1d_experiments", "mnist_experiments")
        }
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.mark.parametrize("seed", [0, 1])
def test_validation_split_partitions_the_training_signals(examples, seed):
    split = examples["section4"].split_train_validation
    train, val = split(4000, 1000, seed)
    assert len(train) == 3000 and len(val) == 1000
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(4000))
    again = split(4000, 1000, seed)
    np.testing.assert_array_equal(again[1], val)  # deterministic


def test_validation_split_differs_between_seeds(examples):
    split = examples["section4"].split_train_validation
    assert not np.array_equal(split(4000, 1000, 0)[1], split(4000, 1000, 1)[1])


def test_mnist_split_is_stratified_disjoint_and_fixed(examples):
    split = examples["mnist_experiments"].stratified_split
    labels = np.repeat(np.arange(10), 500)
    np.random.default_rng(3).shuffle(labels)
    parts = {seed: split(labels, 100, 100, seed) for seed in (0, 1)}
    for train, val, test in parts.values():
        for part, per_class in ((train, 300), (val, 100), (test, 100)):
            np.testing.assert_array_equal(np.bincount(labels[part]), [per_class] * 10)
        every = np.concatenate([train, val, test])
        np.testing.assert_array_equal(np.sort(every), np.arange(5000))
    # The test digits do not move with the seed; the validation ones do.
    np.testing.assert_array_equal(parts[0][2], parts[1][2])
    assert not np.array_equal(parts[0][1], parts[1][1])
    np.testing.assert_array_equal(split(labels, 100, 100, 1)[1], parts[1][1])
    with pytest.raises(ValueError, match="class 0 has 500 examples"):
        split(labels, 250, 250, 0)


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.ascontiguousarray(x)}


@pytest.mark.parametrize("task", ["mnist1d_experiments", "mnist_experiments"])
def test_validation_is_disjoint_from_test_and_from_the_examples_steps_use(
    examples, task
):
    data = examples[task].load()
    train, val, test = _rows(data.x_train), _rows(data.x_val), _rows(data.x_test)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (3000, 1000, 1000)
    assert len(val) == len(data.x_val)  # no duplicates to hide behind
    assert not val & test
    assert not val & train
    # What the steps see: every batch the training loop draws, large and small.
    for batch_size, steps in ((1000, 9), (64, 200)):
        batches = examples["section4"].batch_indices(
            0, len(data.y_train), batch_size, steps
        )
        assert batches.shape == (steps, batch_size)
        assert batches.min() >= 0 and batches.max() < len(data.y_train)
        seen = _rows(data.x_train[batches.ravel()])
        assert not seen & val
        assert not seen & test
        # An epoch is a permutation: no example twice before every one is seen.
        per_epoch = len(data.y_train) // batch_size
        epoch = batches[:per_epoch].ravel()
        assert len(np.unique(epoch)) == epoch.size


def test_sam_halfway_is_a_run_of_half_the_steps(examples):
    # What the "equal gradients" rows rest on: a SAM run's state at half its
    # steps is the end of a run of half the steps, exactly (same seeds, batches).
    section4 = examples["section4"]
    task = examples["mnist1d_experiments"].TASK
    data, seeds = task.load(0), [2022, 2023]
    sam = section4.Method("SAM", "sam", (0.05, 0.2))
    full = section4.Setting(
        64, 0.05, noisy_steps=8, clean_steps=0, chunk=4, num_seeds=2
    )
    half = dataclasses.replace(full, noisy_steps=4)
    long = section4.train_grid(task, sam, full, data, seeds, "ce")
    short = section4.train_grid(task, sam, half, data, seeds, "ce")
    halfway = section4.equal_gradients(long, full)
    for metric in ("test accuracy %", "val accuracy %", "train loss"):
        np.testing.assert_array_equal(halfway[metric], short.final[metric][long.chosen])
    # And the run did move in its second half.
    assert np.all(long.final["train loss"] != long.curves["train loss"][..., 1])


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
