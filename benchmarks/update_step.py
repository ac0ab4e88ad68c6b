"""Times the jitted update step of the noise transforms against their peers.

Candidates: ``optax.sgd``, ``optax.chain(optax.sgd, optax.add_noise)`` (the
closest peer: i.i.d. gaussian noise), ``pgd``, ``anti_pgd`` (stored noise, and
``store_noise=False``), Rademacher ``anti_pgd``, and ``anti_pgd`` whose noise
schedule has already switched the noise off. Trees: (a) one float32 leaf, (b)
160 float32 leaves of the same square shape, (c) a ResNet-50-shaped tree of
mixed shapes (conv kernels, batch-norm scales and biases, the classifier).

A step is ``opt.update`` followed by ``optax.apply_updates``, jitted with the
params and the optimizer state donated, as in a training loop. Every candidate
is compiled on its own (lowering + compilation, timed), warmed up, then all
candidates are called in turn, round after round, so that a burst of load on
the machine hits them alike; the table gives the median of the rounds (each
call ends with ``block_until_ready``) and ratios of medians of the same run.

    python benchmarks/update_step.py            # 10M params; writes RESULTS.md
    python benchmarks/update_step.py --quick    # smoke run, tiny trees: ~1 min,
                                                # nearly all compiling; printed
    python benchmarks/update_step.py --size 100_000_000 --output gpu.md
"""

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_antipgd as ap

LEARNING_RATE = 0.01
NOISE_STD = 0.01
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
# The heading of the hand-written part of a results file, which a run keeps.
NOTES = "## Reading the figures"


def one_leaf(size: int) -> dict[str, jax.ShapeDtypeStruct]:
    return {"w": jax.ShapeDtypeStruct((size,), jnp.float32)}


def square_leaves(size: int, num_leaves: int) -> dict[str, jax.ShapeDtypeStruct]:
    side = max(1, round((size / num_leaves) ** 0.5))
    return {
        f"layer_{i:03d}": jax.ShapeDtypeStruct((side, side), jnp.float32)
        for i in range(num_leaves)
    }


def resnet50_like(width: float, blocks=(3, 4, 6, 3)) -> dict[str, Any]:
    """The parameter shapes of a ResNet-50 (HWIO kernels), widths scaled."""

    def channels(c):
        return max(1, round(c * width))

    def conv(k, cin, cout):
        return jax.ShapeDtypeStruct((k, k, cin, cout), jnp.float32)

    def norm(c):
        vector = jax.ShapeDtypeStruct((c,), jnp.float32)
        return {"scale": vector, "bias": vector}

    stem = channels(64)
    tree = {"stem": {"conv": conv(7, 3, stem), "norm": norm(stem)}}
    cin = stem
    for stage, num_blocks in enumerate(blocks):
        mid = channels(64 * 2**stage)
        out = 4 * mid
        for block in range(num_blocks):
            layers = {
                "conv1": conv(1, cin, mid),
                "norm1": norm(mid),
                "conv2": conv(3, mid, mid),
                "norm2": norm(mid),
                "conv3": conv(1, mid, out),
                "norm3": norm(out),
            }
            if block == 0:
                layers["shortcut"] = conv(1, cin, out)
                layers["shortcut_norm"] = norm(out)
            tree[f"stage{stage + 1}_block{block + 1}"] = layers
            cin = out
    classes = channels(1000)
    tree["head"] = {
        "kernel": jax.ShapeDtypeStruct((cin, classes), jnp.float32),
        "bias": jax.ShapeDtypeStruct((classes,), jnp.float32),
    }
    return tree


def num_params(tree: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def candidates() -> dict[str, Callable[[], optax.GradientTransformation]]:
    key = 0
    # sigma(0) = NOISE_STD, then 0: from the second step on the noise is off.
    switched_off = optax.piecewise_constant_schedule(NOISE_STD, {1: 0.0})
    return {
        "sgd": lambda: optax.sgd(LEARNING_RATE),
        "add_noise+sgd": lambda: optax.chain(
            optax.sgd(LEARNING_RATE),
            optax.add_noise(NOISE_STD**2, 0.55, key),
        ),
        "pgd": lambda: ap.pgd(LEARNING_RATE, NOISE_STD, key),
        "anti_pgd": lambda: ap.anti_pgd(LEARNING_RATE, NOISE_STD, key),
        "anti_pgd(store_noise=False)": lambda: ap.anti_pgd(
            LEARNING_RATE, NOISE_STD, key, store_noise=False
        ),
        "anti_pgd(rademacher)": lambda: ap.anti_pgd(
            LEARNING_RATE, NOISE_STD, key, distribution="rademacher"
        ),
        "anti_pgd(noise off)": lambda: ap.anti_pgd(LEARNING_RATE, switched_off, key),
        "anti_pgd(correlation=0.5)": lambda: ap.anti_pgd(
            LEARNING_RATE, NOISE_STD, key, correlation=0.5
        ),
        "fractional_pgd(hurst=0.25)": lambda: ap.fractional_pgd(
            LEARNING_RATE, NOISE_STD, key, hurst=0.25
        ),
        "fractional_pgd(store_noise=False)": lambda: ap.fractional_pgd(
            LEARNING_RATE, NOISE_STD, key, hurst=0.25, store_noise=False
        ),
        "pgd(leaves=cyclic)": lambda: ap.pgd(
            LEARNING_RATE, NOISE_STD, key, leaves="cyclic"
        ),
        # The memory floors: steps that stream the bytes a candidate must move
        # (read the grads, the params and the stored noise, write the params and
        # one new noise tree) and do nothing else.
        "floor(1 stored tree)": lambda: optax.chain(
            optax.sgd(LEARNING_RATE), streams_only(num_slots=1)
        ),
        "floor(7 stored trees)": lambda: optax.chain(
            optax.sgd(LEARNING_RATE), streams_only(num_slots=7)
        ),
    }


# Which floor each candidate is compared with (sgd for those without state).
FLOORS = {
    "pgd": "sgd",
    "pgd(leaves=cyclic)": "sgd",
    "anti_pgd": "floor(1 stored tree)",
    "anti_pgd(rademacher)": "floor(1 stored tree)",
    "anti_pgd(noise off)": "floor(1 stored tree)",
    "anti_pgd(correlation=0.5)": "floor(1 stored tree)",
    "fractional_pgd(hurst=0.25)": "floor(7 stored trees)",
}


def streams_only(num_slots: int) -> optax.GradientTransformation:
    """Reads ``num_slots`` params-sized trees of state, writes one: no noise."""

    def init(params):
        return tuple(jax.tree.map(jnp.zeros_like, params) for _ in range(num_slots))

    def update(updates, state, params=None):
        del params
        total = jax.tree.map(lambda *slots: sum(slots), *state)
        updates = jax.tree.map(lambda u, t: u + t, updates, total)
        # One slot rewritten (with what an update would write), the rest kept.
        return updates, (jax.tree.map(lambda u: 0 * u, updates), *state[1:])

    return optax.GradientTransformation(init, update)


def tree_bytes(tree: Any) -> int:
    def nbytes(leaf):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # add_noise's key
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        return int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize

    return sum(map(nbytes, jax.tree.leaves(tree)))


class Timed:
    """A step timed call by call: ``call`` runs it once, ``times`` holds the calls."""

    def timed_call(self):
        start = time.perf_counter()
        self.call()
        self.times.append(time.perf_counter() - start)

    @property
    def step_s(self):
        return statistics.median(self.times)


class Candidate(Timed):
    """One optimizer on one tree: its compiled step and its live buffers."""

    def __init__(self, name, make_opt, shapes, donate=True):
        self.name = name
        opt = make_opt()

        def step(params, state, grads):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        fill = lambda value: lambda s: jnp.full(s.shape, value, s.dtype)  # noqa: E731
        self.params = jax.tree.map(fill(1.0), shapes)
        self.grads = jax.tree.map(fill(0.5), shapes)
        self.state = jax.jit(opt.init)(self.params)
        self.state_bytes = tree_bytes(self.state)
        start = time.perf_counter()
        self.compiled = (
            jax.jit(step, donate_argnums=(0, 1) if donate else ())
            .lower(self.params, self.state, self.grads)
            .compile()
        )
        self.compile_s = time.perf_counter() - start
        analysis = self.compiled.memory_analysis()
        self.temp_bytes = None if analysis is None else analysis.temp_size_in_bytes
        self.times = []

    def call(self):
        self.params, self.state = self.compiled(self.params, self.state, self.grads)
        jax.block_until_ready((self.params, self.state))


def run_tree(shapes, repeats, warmup, compile_repeats, only=None, donate=True):
    makers = {
        name: make
        for name, make in candidates().items()
        if only is None
        or name in only
        or name in ("sgd", "add_noise+sgd")
        or name in {FLOORS.get(n) for n in only}
    }
    compile_times = {name: [] for name in makers}
    runs = {}
    for _ in range(compile_repeats):  # interleaved as well
        for name, make in makers.items():
            runs[name] = Candidate(name, make, shapes, donate)
            compile_times[name].append(runs[name].compile_s)
    for run in runs.values():
        run.compile_s = statistics.median(compile_times[run.name])
        for _ in range(warmup):
            run.call()
    order = list(runs.values())
    for round_ in range(repeats):
        # Rotate the order so no candidate always follows the same one.
        shift = round_ % len(order)
        for run in order[shift:] + order[:shift]:
            run.timed_call()
    return runs


def table(runs, params_bytes):
    peer, sgd = runs["add_noise+sgd"], runs["sgd"]
    lines = [
        "| candidate | step (ms) | x add_noise | x sgd | compile (s) "
        "| x floor | compile x add_noise | state (bytes) | state / params "
        "| temp (MB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs.values():
        temp = "n/a" if run.temp_bytes is None else f"{run.temp_bytes / 1e6:.1f}"
        floor = runs.get(FLOORS.get(run.name))
        to_floor = "-" if floor is None else f"{run.step_s / floor.step_s:.2f}"
        lines.append(
            f"| {run.name} | {run.step_s * 1e3:.2f} | {run.step_s / peer.step_s:.2f} "
            f"| {run.step_s / sgd.step_s:.2f} | {run.compile_s:.2f} | {to_floor} "
            f"| {run.compile_s / peer.compile_s:.2f} | {run.state_bytes:,} "
            f"| {run.state_bytes / params_bytes:.2f} | {temp} |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            models = [
                line.split(":", 1)[1].strip() for line in f if "model name" in line
            ]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    cores = f"{os.cpu_count()} cores"
    if hasattr(os, "sched_getaffinity"):
        cores += f" ({len(os.sched_getaffinity(0))} usable)"
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    return (
        f"{platform.system()} {platform.machine()}, {cpu}, {cores}; "
        f"jax backend {jax.default_backend()} ({kind}, {jax.device_count()} device(s))"
    )


def load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=None, help="params per tree")
    parser.add_argument("--leaves", type=int, default=160, help="leaves of tree (b)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-repeats", type=int, default=None)
    parser.add_argument("--trees", default="abc", help="subset of 'abc'")
    parser.add_argument("--only", nargs="*", default=None, help="candidate names")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run on tiny trees"
    )
    parser.add_argument(
        "--no-donate", action="store_true", help="jit the step without donation"
    )
    parser.add_argument(
        "--output", default=None, help=f"markdown file (default: {RESULTS})"
    )
    args = parser.parse_args(argv)
    if args.quick:
        size = int(args.size or 20_000)
        leaves = min(args.leaves, 4)
        repeats, compile_repeats = args.repeats or 5, args.compile_repeats or 1
        # Compiling dominates a smoke run: keep the leaves few.
        resnet = resnet50_like((size / 25_557_032) ** 0.5, blocks=())
        resnet_name = "ResNet-50's stem and head"
    else:
        size = int(args.size or 10_000_000)
        leaves = args.leaves
        repeats, compile_repeats = args.repeats or 40, args.compile_repeats or 2
        resnet = resnet50_like((size / 10_000_000) ** 0.5)
        resnet_name = "ResNet-50"
    trees = {
        "a": (f"(a) one leaf of {size:,} float32", one_leaf(size)),
        "b": (
            f"(b) {leaves} leaves of {square_leaves(size, leaves)['layer_000'].shape}"
            " float32",
            square_leaves(size, leaves),
        ),
        "c": (
            f"(c) {resnet_name}-shaped: {len(jax.tree.leaves(resnet))} leaves, "
            f"{num_params(resnet):,} float32",
            resnet,
        ),
    }
    header = [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- jax {jax.__version__}, jaxlib {jax.lib.__version__}, "
        f"optax {optax.__version__}, optax_antipgd {ap.__version__}, "
        f"python {platform.python_version()}",
        f"- command: `python benchmarks/update_step.py {' '.join(sys.argv[1:])}`",
        f"- {repeats} interleaved rounds after {args.warmup} warm-up calls; "
        f"compile time: median of {compile_repeats}",
    ]
    print("\n".join(header), flush=True)
    sections = []
    for letter in args.trees:
        title, shapes = trees[letter]
        before = load()
        runs = run_tree(
            shapes, repeats, args.warmup, compile_repeats, args.only, not args.no_donate
        )
        section = (
            f"### {title}\n\nload average (1/5/15 min) before: {before}, "
            f"after: {load()}\n\n{table(runs, tree_bytes(shapes))}\n"
        )
        print("\n" + section, flush=True)
        sections.append(section)
    output = args.output or (None if args.quick else RESULTS)
    if output:
        # Keep the hand-written reading of the figures, from its heading on.
        path = pathlib.Path(output)
        old = path.read_text() if path.exists() else ""
        notes = old[old.find(NOTES) :] if NOTES in old else ""
        path.write_text(
            "# Benchmark results\n\n"
            + "\n".join(header)
            + "\n\n"
            + "\n".join(sections)
            + ("\n" + notes if notes else "")
        )
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
