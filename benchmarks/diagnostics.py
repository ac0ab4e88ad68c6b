"""Compile and run time of each flatness diagnostic on the MNIST-1D CNN.

Each diagnostic is jitted over three seeds' params (``jax.vmap``, as the
examples run them) at the CNN's loss on the 3,000 training examples, with
the examples' settings. References measured in the same run: one gradient
(run-time ratios are to it) and a hand-written Hutchinson loop, 64 Rademacher
probes through ``jax.jvp`` of ``jax.grad`` under ``jax.vmap`` (compile-time
ratios are to it). Compile time is lowering plus compilation, run time the
median of interleaved rounds, each call ending with ``block_until_ready``.

    python benchmarks/diagnostics.py           # 3 rounds: about 20 min on 2 cores
    python benchmarks/diagnostics.py --quick   # 1 round: about 8 min
"""

import argparse
import datetime
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import optax_antipgd as ap

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import mnist1d_experiments as mnist1d  # noqa: E402
import section4  # noqa: E402

PROBES = 64
LANCZOS_STEPS = 32  # the examples' default
SPECTRUM_PROBES = 8
NUM_SEEDS = 3


def hand_hutchinson(objective, params, key):
    """Hutchinson's trace written out: the loop the diagnostics must match."""
    flat, unravel = ravel_pytree(params)
    grad = jax.grad(lambda v: objective(unravel(v)))
    probes = jax.random.rademacher(key, (PROBES, flat.size), flat.dtype)

    def form(z):
        return z @ jax.jvp(grad, (flat,), (z,))[1]

    return jnp.mean(jax.vmap(form)(probes))


def candidates(objective):
    """name -> fn(params, key) of one seed."""
    return {
        "gradient": lambda p, k: jax.grad(objective)(p),
        "one HVP": lambda p, k: jax.jvp(jax.grad(objective), (p,), (p,))[1],
        "hand Hutchinson (64)": lambda p, k: hand_hutchinson(objective, p, k),
        "hessian_trace (64)": lambda p, k: ap.hessian_trace(
            objective, p, k, num_samples=PROBES
        ),
        "hessian_trace (64, batch 8)": lambda p, k: ap.hessian_trace(
            objective, p, k, num_samples=PROBES, batch_size=8
        ),
        "hessian_trace hutch++ (64)": lambda p, k: ap.hessian_trace(
            objective, p, k, num_samples=PROBES, estimator="hutch++"
        ),
        "hessian_trace_with_stderr (64)": lambda p, k: ap.hessian_trace_with_stderr(
            objective, p, k, num_samples=PROBES
        ),
        "hessian_block_traces (64)": lambda p, k: ap.hessian_block_traces(
            objective, p, k, num_samples=PROBES
        ),
        "hessian_eigenvalues (k=1, 32)": lambda p, k: ap.hessian_eigenvalues(
            objective, p, k, k=1, num_matvecs=LANCZOS_STEPS
        ),
        "hessian_spectrum (8 x 32)": lambda p, k: ap.hessian_spectrum(
            objective, p, k, num_matvecs=LANCZOS_STEPS, num_samples=SPECTRUM_PROBES
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)

    data = mnist1d.load()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    params = mnist1d.TASK.init_params_program(
        jax.random.split(jax.random.key(0), NUM_SEEDS)
    )
    keys = jax.random.split(jax.random.key(1), NUM_SEEDS)
    loss = section4.LOSSES["ce"]

    def objective(p):
        return loss(mnist1d.TASK.logits_fn(p, x), y)

    compiled, compile_s = {}, {}
    for name, fn in candidates(objective).items():
        start = time.perf_counter()
        compiled[name] = jax.jit(jax.vmap(fn)).lower(params, keys).compile()
        compile_s[name] = time.perf_counter() - start
        jax.block_until_ready(compiled[name](params, keys))  # warm-up
        print(f"compiled {name} in {compile_s[name]:.2f} s", flush=True)
    times = {name: [] for name in compiled}
    for _ in range(rounds):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, keys))
            times[name].append(time.perf_counter() - start)
    run_s = {name: statistics.median(t) for name, t in times.items()}

    num_params = sum(leaf.size for leaf in jax.tree.leaves(params)) // NUM_SEEDS
    print(
        f"- {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {jax.devices()[0].device_kind}, "
        f"{len(jax.devices())} device(s), jax {jax.__version__}"
    )
    print(
        f"- MNIST-1D CNN ({num_params:,} params), cross-entropy on "
        f"{x.shape[0]:,} examples, {NUM_SEEDS} seeds vmapped; median of "
        f"{rounds} rounds\n"
    )
    print("| diagnostic | run (ms) | x gradient | compile (s) | x hand Hutchinson |")
    print("| --- | ---: | ---: | ---: | ---: |")
    hand = compile_s["hand Hutchinson (64)"]
    for name in compiled:
        print(
            f"| {name} | {1e3 * run_s[name]:.1f} | "
            f"{run_s[name] / run_s['gradient']:.1f} | {compile_s[name]:.2f} | "
            f"{compile_s[name] / hand:.2f} |"
        )


if __name__ == "__main__":
    main()
