"""Smoke tests of examples/: every script runs with --quick and says what it found.

The quick reproduction is also checked for the paper's orderings that hold at
its reduced size: Anti-PGD ends flatter (valley) and generalizes better
(sparse regression, matrix sensing) than GD, which beats PGD.
"""

import json
import pathlib
import subprocess
import sys

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


def test_reproduction_writes_tables_and_figures(quick_reproduction):
    out, stdout, results = quick_reproduction
    assert set(results) == {"valley", "sparse_regression", "matrix_sensing", "digits"}
    for name in results:
        assert f"## {name}" in stdout
        assert (out / f"{name}.png").stat().st_size > 0
    assert "| Anti-PGD |" in (out / "results.md").read_text()
    assert set(results["digits"]) == {
        "GD",
        "PGD",
        "Anti-PGD",
        "optax.noisy_sgd",
        "optax.contrib.sam",
    }


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


def test_flax_nnx_example_runs():
    stdout = _run("flax_nnx.py")
    assert "denoised w_n - xi_n" in stdout


def test_flax_linen_example_runs():
    stdout = _run("flax_linen.py")
    assert "denoised" in stdout


def test_seeds_vmap_example_runs():
    stdout = _run("seeds_vmap.py")
    assert "| 0.05 |" in stdout
