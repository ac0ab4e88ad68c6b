"""Data-parallel Anti-PGD on every device of one host or of many processes.

The global batch is split across all devices (``NamedSharding`` over a 1-D
mesh ``"data"``), the params and the optimizer state are replicated, and
``jax.jit`` inserts the gradient all-reduce. The noise needs no communication:
every device draws the same ``xi_n`` from the replicated key and step count,
so the replicas never drift apart. The same script runs:

- on one host with all its local devices (GPUs, TPU cores, or CPU devices
  faked with ``--cpu-devices``)::

      python examples/data_parallel.py --cpu-devices 4

- as N local processes joined by ``jax.distributed`` (the script launches
  them, on 127.0.0.1 with a free port, and prints their output line by line,
  each line prefixed with ``[process i]``)::

      python examples/data_parallel.py --num-processes 2 --cpu-devices 2

- as one process of a real multi-host job, started once per host::

      python examples/data_parallel.py --coordinator-address host0:1234 \
          --num-processes 4 --process-id $RANK

  or, where ``jax.distributed.initialize()`` detects the cluster itself (SLURM,
  cloud TPU, Open MPI, ...)::

      python examples/data_parallel.py --auto-initialize

It prints the loss before and after training, the loss of the noise-free
iterate ``denoised_params``, the speed, and a digest of the final params that
every process prints alike. ``--quick`` runs a few steps as a smoke test.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

# Steps dispatched ahead of the devices. With dozens of multi-device steps
# queued, XLA's CPU runtime can hang in a collective that not every device
# reaches (seen with jax 0.10 on a 2-core host from about 32 steps on, in one
# process and in two); a short queue keeps the devices just as busy.
MAX_STEPS_IN_FLIGHT = 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--noise-std", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="fake this many CPU devices per process (sets XLA_FLAGS)",
    )
    parser.add_argument(
        "--num-processes",
        type=int,
        default=1,
        help="without --process-id: launch this many local processes",
    )
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--coordinator-address", default=None, help="host:port")
    parser.add_argument(
        "--auto-initialize",
        action="store_true",
        help="jax.distributed.initialize() with no arguments (SLURM, cloud TPU...)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds, launcher only"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 20)
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def forward_lines(stream, sink, prefix: str, lock: threading.Lock) -> None:
    """Copies a child's output to ``sink`` one whole line at a time, prefixed."""
    with stream:
        for line in stream:
            if not line.endswith("\n"):
                line += "\n"
            with lock:
                sink.write(prefix + line)
                sink.flush()


def wait_for_all(processes, timeout_s: float) -> str | None:
    """Waits until all processes succeed (None), or says why not."""
    deadline = time.monotonic() + timeout_s
    while True:
        running = False
        for process_id, process in enumerate(processes):
            returncode = process.poll()
            if returncode is None:
                running = True
            elif returncode != 0:
                return f"process {process_id} exited with status {returncode}"
        if not running:
            return None
        if time.monotonic() > deadline:
            return f"timed out after {timeout_s} s"
        time.sleep(0.05)


def launch_local_processes(args, argv) -> int:
    """Starts ``--num-processes`` copies of this script on 127.0.0.1 and waits.

    Each process writes to pipes of its own; the launcher forwards their
    output whole line by whole line, each prefixed with the process id, so
    the lines of different processes never run into each other.
    """
    address = f"127.0.0.1:{free_port()}"
    lock = threading.Lock()
    processes, forwarders = [], []
    try:
        for process_id in range(args.num_processes):
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-u",  # unbuffered: each line reaches the launcher as printed
                    os.path.abspath(__file__),
                    *argv,
                    "--process-id",
                    str(process_id),
                    "--coordinator-address",
                    address,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
            )
            processes.append(process)
            for stream, sink in (
                (process.stdout, sys.stdout),
                (process.stderr, sys.stderr),
            ):
                forwarder = threading.Thread(
                    target=forward_lines,
                    args=(stream, sink, f"[process {process_id}] ", lock),
                    daemon=True,
                )
                forwarder.start()
                forwarders.append(forwarder)
        failure = wait_for_all(processes, args.timeout)
    finally:
        # One process failing leaves the others waiting on it: end them all.
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        # Their pipes are closed now: the forwarders finish their last lines.
        for forwarder in forwarders:
            forwarder.join(timeout=10)
    if failure is None:
        return 0
    with lock:
        print(f"{failure}: stopped every process still running", file=sys.stderr)
    return 1


def train(args) -> None:
    if args.cpu_devices is not None:
        # Read once, when jax starts its CPU backend: set before importing jax.
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} "
            f"--xla_force_host_platform_device_count={args.cpu_devices}"
        )
    import jax

    distributed = args.auto_initialize or args.process_id is not None
    if distributed:
        # CPU devices of different processes talk over gloo; GPUs and TPUs
        # ignore this setting and use their own collectives.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if args.auto_initialize:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(
                coordinator_address=args.coordinator_address,
                num_processes=args.num_processes,
                process_id=args.process_id,
            )

    import hashlib

    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import optax_antipgd as ap

    num_devices = jax.device_count()
    if args.batch_size % num_devices:
        raise SystemExit(
            f"--batch-size {args.batch_size} must be divisible by the "
            f"{num_devices} devices."
        )
    mesh = jax.make_mesh((num_devices,), ("data",))
    replicated = NamedSharding(mesh, P())
    by_example = NamedSharding(mesh, P("data"))
    leader = jax.process_index() == 0

    # Every process makes the same global data set from the same seed and
    # hands each of its devices that device's rows.
    rng = np.random.default_rng(args.seed)
    features = rng.normal(size=(args.batch_size, 8)).astype(np.float32)
    targets = np.sin(features @ rng.normal(size=(8, 1))).astype(np.float32)
    x, y = (
        jax.make_array_from_callback(a.shape, by_example, lambda index, a=a: a[index])
        for a in (features, targets)
    )
    params = {
        "hidden": {
            "kernel": (rng.normal(size=(8, 32)) / np.sqrt(8)).astype(np.float32),
            "bias": np.zeros(32, np.float32),
        },
        "out": {
            "kernel": (rng.normal(size=(32, 1)) / np.sqrt(32)).astype(np.float32),
            "bias": np.zeros(1, np.float32),
        },
    }
    params = jax.device_put(params, replicated)

    opt = ap.anti_pgd(args.learning_rate, args.noise_std, key=args.seed)
    state = jax.jit(opt.init, out_shardings=replicated)(params)

    def loss_fn(params, x, y):
        hidden = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
        prediction = hidden @ params["out"]["kernel"] + params["out"]["bias"]
        return jnp.mean((prediction - y) ** 2)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    evaluate = jax.jit(loss_fn, out_shardings=replicated)
    denoised_loss = jax.jit(
        lambda state, params, x, y: loss_fn(ap.denoised_params(state, params), x, y),
        out_shardings=replicated,
    )

    def scalar(array):
        return float(array.addressable_data(0))

    # Every process runs every computation (each takes part in the collectives);
    # only process 0 prints.
    initial_loss = scalar(evaluate(params, x, y))
    if leader:
        print(
            f"{jax.process_count()} process(es), {num_devices} device(s) "
            f"({jax.local_device_count()} local, {jax.devices()[0].platform}), "
            f"global batch {args.batch_size}, {args.steps} Anti-PGD steps"
        )
        print(f"initial loss {initial_loss:.6f}")

    params, state, loss = step(params, state, x, y)  # compiles
    loss.block_until_ready()
    start = time.perf_counter()
    for n in range(1, args.steps):
        params, state, loss = step(params, state, x, y)
        if n % MAX_STEPS_IN_FLIGHT == 0:
            loss.block_until_ready()
        if leader and (n + 1) % 100 == 0:
            print(f"step {n + 1:5d}  loss {scalar(loss):.6f}")
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start

    # The replicas must agree bit for bit: check it across processes.
    multihost_utils.assert_equal(params, "params differ between processes")
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
    final_loss = scalar(evaluate(params, x, y))
    final_denoised_loss = scalar(denoised_loss(state, params, x, y))
    if leader:
        print(f"final loss {final_loss:.6f}")
        print(f"denoised loss {final_denoised_loss:.6f}")
        if args.steps > 1:
            print(f"{(args.steps - 1) / seconds:.1f} steps/s after compilation")
    # One write per line, flushed: a cluster's launcher (srun, mpirun) may merge
    # the processes' outputs.
    sys.stdout.write(
        f"process {jax.process_index()}: params sha256 {digest.hexdigest()[:16]}\n"
    )
    sys.stdout.flush()
    if distributed:
        jax.distributed.shutdown()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.num_processes > 1 and args.process_id is None and not args.auto_initialize:
        return launch_local_processes(args, argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
