"""Scale-out: pmap, sharded jit, shard_map and multi-process jax.distributed.

JAX fixes the number of host devices when it starts, so every check here runs
in a subprocess that fakes CPU devices before importing jax:

- ``_scale_out_checks.py`` (8 devices, one launch) runs every single-process
  check for :data:`OPTIMIZERS`; each test below reads its own outcome.
- ``_distributed_worker.py`` runs twice as a 2-process ``jax.distributed`` job
  (gloo collectives on 127.0.0.1) and once as a single 4-device process.
- ``examples/data_parallel.py --quick`` runs on one process and on two.

Each subprocess has a timeout and is killed if the test fails.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
OPTIMIZERS = (
    "pgd",
    "anti_pgd",
    "anti_pgd_regenerated",
    "anti_pgd_rademacher",
    "fractional_pgd",
    "pgd_cyclic",
)
TIMEOUT_S = 600


def _env():
    env = dict(os.environ)
    # Each script sets its own device count before it imports jax.
    env["XLA_FLAGS"] = " ".join(
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    )
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_all(commands, log_dir, timeout_s=TIMEOUT_S):
    """Runs the commands at once; returns (returncode, output) of each.

    Fails the test if one runs past the deadline; whatever is left running
    when this returns or raises is killed.
    """
    processes, logs = [], []
    try:
        for index, command in enumerate(commands):
            log = open(log_dir / f"process_{index}.log", "w+")  # noqa: SIM115
            logs.append(log)
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + timeout_s
        for process in processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{process.args} ran past {timeout_s} s", pytrace=False)
        results = []
        for process, log in zip(processes, logs, strict=True):
            log.seek(0)
            results.append((process.returncode, log.read()))
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()


def _assert_succeeded(returncode, output):
    assert returncode == 0, f"exit status {returncode}:\n{output[-6000:]}"


# ------------------------------------------- single process, 8 host devices


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale_out_checks")
    out = work / "results.json"
    [(returncode, output)] = _run_all(
        [[sys.executable, str(TESTS / "_scale_out_checks.py"), str(out)]], work
    )
    _assert_succeeded(returncode, output)
    return json.loads(out.read_text())


def _outcome(checks, check, optimizer):
    outcome = checks["results"][check][optimizer]
    if outcome != "ok":
        pytest.fail(f"{check}[{optimizer}]:\n{outcome}", pytrace=False)


def test_checks_ran_on_eight_devices_for_every_optimizer(checks):
    assert checks["device_count"] == 8
    for check, outcomes in checks["results"].items():
        assert set(outcomes) == set(OPTIMIZERS), check
    tests = {name[len("test_") :] for name in globals() if name.startswith("test_")}
    assert set(checks["results"]) <= tests, set(checks["results"]) - tests


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_pmap_replicated_state_updates_equal_single_device(checks, optimizer):
    """Every replica's updates equal the one-device run, and each other."""
    _outcome(checks, "pmap_replicated_state_updates_equal_single_device", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_pmap_data_parallel_replicas_never_drift(checks, optimizer):
    """200 steps with lax.pmean gradients: replicas bit-identical at every step."""
    _outcome(checks, "pmap_data_parallel_replicas_never_drift", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_sharded_jit_updates_equal_single_device(checks, optimizer):
    _outcome(checks, "sharded_jit_updates_equal_single_device", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_sharded_jit_output_shardings_equal_params_shardings(checks, optimizer):
    _outcome(checks, "sharded_jit_output_shardings_equal_params_shardings", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_sharded_jit_stored_noise_sharded_like_params(checks, optimizer):
    """The state's xi_n after a jitted step: the params' sharding, not replicated."""
    _outcome(checks, "sharded_jit_stored_noise_sharded_like_params", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_sharded_jit_compiled_update_has_no_collective(checks, optimizer):
    _outcome(checks, "sharded_jit_compiled_update_has_no_collective", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_sharded_jit_with_out_shardings_keeps_noise_sharded_without_collective(
    checks, optimizer
):
    """The Scale-out page's recipe: the step's out_shardings pinned to the state's."""
    _outcome(
        checks,
        "sharded_jit_with_out_shardings_keeps_noise_sharded_without_collective",
        optimizer,
    )


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_sharded_jit_results_do_not_depend_on_device_count(checks, optimizer):
    """1, 2 and 8 devices: bit-identical params, updates and states."""
    _outcome(checks, "sharded_jit_results_do_not_depend_on_device_count", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_init_on_shape_dtype_structs_via_eval_shape(checks, optimizer):
    _outcome(checks, "init_on_shape_dtype_structs_via_eval_shape", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_init_under_jit_with_out_shardings(checks, optimizer):
    _outcome(checks, "init_under_jit_with_out_shardings", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_state_shardings_from_optax_tree_map_params(checks, optimizer):
    """optax's own way to derive the state's shardings from the params'."""
    _outcome(checks, "state_shardings_from_optax_tree_map_params", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_init_on_sharded_params_shards_noise_like_params(checks, optimizer):
    """Eager init, and jit(init) without out_shardings, on sharded params."""
    _outcome(checks, "init_on_sharded_params_shards_noise_like_params", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_shard_map_runs_on_per_device_shards(checks, optimizer):
    """Inside shard_map each block is a whole params tree with the same noise."""
    _outcome(checks, "shard_map_runs_on_per_device_shards", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_shard_map_with_axis_index_in_key_draws_distinct_noise(checks, optimizer):
    """key=fold_in(key, axis_index) inside shard_map: each block its own noise."""
    _outcome(checks, "shard_map_with_axis_index_in_key_draws_distinct_noise", optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_eager_init_on_sharded_params_never_moves_a_whole_leaf(checks, optimizer):
    """Eager init and update on params over 8 devices draw each block in place."""
    _outcome(checks, "eager_init_on_sharded_params_never_moves_a_whole_leaf", optimizer)


# ------------------------------------------------ several jax.distributed processes


def test_two_processes_end_bit_identical_and_equal_one_process_run(tmp_path):
    """Noise bit for bit across topologies; all-reduced quantities to rounding."""
    num_devices = 4
    worker = [sys.executable, str(TESTS / "_distributed_worker.py"), "--steps", "20"]
    port = str(_free_port())
    commands = [
        worker
        + ["--num-processes", "2", "--process-id", str(process_id), "--port", port]
        + ["--local-devices", str(num_devices // 2)]
        + ["--out", str(tmp_path / f"{process_id}.npz")]
        for process_id in range(2)
    ]
    commands.append(
        worker
        + ["--num-processes", "1", "--local-devices", str(num_devices)]
        + ["--out", str(tmp_path / "single.npz")]
    )
    for returncode, output in _run_all(commands, tmp_path):
        _assert_succeeded(returncode, output)
    first, second, single = (
        dict(np.load(tmp_path / f"{name}.npz")) for name in ("0", "1", "single")
    )
    assert set(first) == set(second) == set(single)
    # The two processes hold copies of the same replicated arrays, all-reduced
    # ones included: bit for bit.
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)

    # The noise is a function of the key, the step count and the leaf's path:
    # bit for bit in any topology, and the same whether or not the params
    # trained. The noise-only run (learning rate 0) adds it to the initial
    # params with no reduction in between, so its params are exact too.
    exact = [
        name for name in first if "/noise[" in name or "/noise_only/params[" in name
    ]
    # 4 leaves: their noise-only params, and the stored noise, a ring per
    # leaf for anti_pgd (both runs) and the 8-tap fractional_pgd, none for pgd.
    assert len(exact) == 3 * 4 + 3 * 4, sorted(first)
    for name in exact:
        np.testing.assert_array_equal(first[name], single[name], err_msg=name)
        if "/trained/noise[" in name:
            untrained = name.replace("/trained/", "/noise_only/")
            np.testing.assert_array_equal(first[name], first[untrained], err_msg=name)

    # A loss is a mean of squares over the batch, whose rows the devices hold.
    # Each device sums its 8 rows, the same in both topologies; the all-reduce
    # adds the devices' partial sums in an order the topology sets: left to
    # right within one process, per process first and then over gloo with two.
    # Any order of n terms of one sign (here n = num_devices partial sums of
    # squares) is within (n - 1) u of their exact sum (u = eps / 2; Higham,
    # Accuracy and Stability of Numerical Algorithms, 4.2), so two orders
    # differ by at most (n - 1) eps relative, and the division by the batch
    # size rounds each once more: num_devices * eps in all. Seen: 1 ulp.
    losses = [name for name in first if name.endswith("/loss")]
    once_reduced = ["initial_loss"] + [n for n in losses if "/noise_only/" in n]
    for name in once_reduced:
        np.testing.assert_allclose(
            first[name],
            single[name],
            rtol=num_devices * np.finfo(np.float32).eps,
            atol=0,
            err_msg=name,
        )

    # The trained run all-reduces the gradients at every step: last-bit
    # differences, kept small by 20 steps of gradient descent.
    trained = [n for n in first if "/trained/params[" in n]
    trained += [n for n in losses if "/trained/" in n]
    assert sorted(exact + once_reduced + trained) == sorted(first), sorted(first)
    for name in trained:
        np.testing.assert_allclose(
            first[name], single[name], rtol=1e-5, atol=1e-6, err_msg=name
        )
        if name.endswith("/loss"):
            assert first[name] < 0.9 * first["initial_loss"], name


# --------------------------------------------------------------------- example

# The launcher forwards each process's output whole line by whole line, each
# line prefixed with "[process i] "; a single process prints unprefixed lines.
_PROCESS_LINE = re.compile(r"\[process (\d+)\] (.*)")
_LOSS = re.compile(r"^(initial|final|denoised) loss (\S+)$", re.MULTILINE)
_DIGEST = re.compile(r"^process (\d+): params sha256 (\w+)$", re.MULTILINE)


def _output_by_process(output: str) -> dict[int, str]:
    """The lines of each process in the launcher's output, prefixes removed."""
    lines = {}
    for line in output.splitlines():
        if match := _PROCESS_LINE.fullmatch(line):
            lines.setdefault(int(match[1]), []).append(match[2])
    return {process_id: "\n".join(text) for process_id, text in lines.items()}


def _losses(output: str) -> dict[str, float]:
    found = _LOSS.findall(output)
    losses = {kind: float(value) for kind, value in found}
    assert len(losses) == len(found), found
    return losses


def test_data_parallel_example_runs_on_one_and_on_two_processes(tmp_path):
    example = [sys.executable, str(ROOT / "examples" / "data_parallel.py"), "--quick"]
    [(one_code, one_process), (two_code, two_processes)] = _run_all(
        [
            example + ["--cpu-devices", "4"],
            example
            + ["--cpu-devices", "2", "--num-processes", "2", "--timeout", "300"],
        ],
        tmp_path,
    )
    _assert_succeeded(one_code, one_process)
    _assert_succeeded(two_code, two_processes)
    by_process = _output_by_process(two_processes)
    assert set(by_process) == {0, 1}, two_processes

    assert "1 process(es), 4 device(s) (4 local, cpu)" in one_process
    assert "2 process(es), 4 device(s) (2 local, cpu)" in by_process[0]
    one_losses = _losses(one_process)
    assert set(one_losses) == {"initial", "final", "denoised"}, one_process
    assert one_losses["final"] < one_losses["initial"]
    # Only process 0 reports; its losses differ from the one-process run's by
    # the all-reduce's rounding only, and are printed to 6 decimals.
    two_losses = _losses(by_process[0])
    assert set(two_losses) == set(one_losses), by_process[0]
    assert _losses(by_process[1]) == {}, by_process[1]
    for kind, loss in one_losses.items():
        assert abs(two_losses[kind] - loss) <= 2e-6, (kind, two_losses, one_losses)

    # Each process prints a digest of its own copy of the params: all alike.
    digests = {}
    for process_id, output in by_process.items():
        found = _DIGEST.findall(output)
        assert len(found) == 1, output
        [(printed_id, digest)] = found
        assert int(printed_id) == process_id, output
        digests[process_id] = digest
    assert digests[0] == digests[1], digests
