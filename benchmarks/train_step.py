"""Times whole jitted training steps with the noise transforms against their peers.

Where ``update_step.py`` times the optimizer's update alone, here a step is the
loss and its gradient, ``opt.update`` and ``optax.apply_updates``, jitted with
the params and the optimizer state donated (``donate_argnums=(0, 1)``), as in a
training loop: what the noise costs beside the model's own work. Models, their
params initialised from a fixed key, on one synthetic batch of a fixed seed
(random normal inputs, random labels): (1) an MLP 784-1024-1024-10, batch 128,
softmax cross-entropy; (2) a decoder-only transformer (4 pre-norm layers,
d_model 256, 4 heads, MLP 1024, learned positions, tied embeddings) on 128
tokens of a vocabulary of 1024, batch 8, next-token cross-entropy; (3) the
MNIST-1D CNN of ``examples/mnist1d_experiments.py``, batch 64; (4) the 2-D CNN
of ``examples/mnist_experiments.py``, batch 64.

Candidates: ``optax.sgd`` (momentum 0.9), ``optax.chain(optax.sgd,
optax.add_noise)`` (the closest peer: i.i.d. gaussian noise), ``pgd``,
``anti_pgd`` (stored noise, ``store_noise=False``, Rademacher, and a noise
schedule that has switched the noise off after the first step),
``fractional_pgd(hurst=0.25)``, ``optax.adamw`` and ``adamw`` followed by
``add_anticorrelated_noise``, and SAM (``optax.contrib.sam`` in opaque mode,
one ascent step on the same batch) as a reference: it computes two gradients
per step where the others compute one.

Every candidate is compiled on its own (lowering + compilation, timed), warmed
up, then all candidates are called in turn, round after round, so that a burst
of load on the machine hits them alike; the tables give the median of the
rounds (each call ends with ``block_until_ready`` on the params, the state and
the loss) and ratios of medians of the same run. ``--threads`` re-runs the
MLP's ``sgd``, ``sgd+add_noise``, ``pgd`` and ``anti_pgd`` in subprocesses
pinned (``os.sched_setaffinity``, before jax starts) to one core and to all the
cores this process may use, alternately, and compares their step times.

    python benchmarks/train_step.py             # the four models; printed only
    python benchmarks/train_step.py --output benchmarks/TRAIN_STEP.md \\
        --json train_step.json                  # + a markdown and a JSON file
    python benchmarks/train_step.py --quick     # smoke run, tiny models: 1.5 min
                                                # on 2 cores, nearly all compiling
    python benchmarks/train_step.py --models mlp transformer --rounds 50
    python benchmarks/train_step.py --threads --models  # the threads table only
"""

import argparse
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# The report's header is update_step.py's (beside this script; the --threads
# children run it by path, without its folder on sys.path).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from update_step import Timed  # noqa: E402
from update_step import load  # noqa: E402
from update_step import machine  # noqa: E402
from update_step import num_params  # noqa: E402

import optax_antipgd as ap

LEARNING_RATE = 0.01
NOISE_STD = 0.01
MOMENTUM = 0.9
EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
PEERS = ("sgd", "sgd+add_noise")  # the ratios' denominators, always run
THREAD_CANDIDATES = ("sgd", "sgd+add_noise", "pgd", "anti_pgd")
NEEDS_GRAD_FN = ("sam",)  # updates that take ``grad_fn`` (on the step's batch)


def candidates() -> dict[str, Callable[[], optax.GradientTransformation]]:
    key = 0
    # sigma(0) = NOISE_STD, then 0: from the second step on the noise is off.
    switched_off = optax.piecewise_constant_schedule(NOISE_STD, {1: 0.0})
    sgd = lambda: optax.sgd(LEARNING_RATE, momentum=MOMENTUM)  # noqa: E731
    return {
        "sgd": sgd,
        # add_noise's eta is the variance: the same sigma as pgd's, constant.
        "sgd+add_noise": lambda: optax.chain(
            sgd(), optax.add_noise(NOISE_STD**2, 0.0, seed=key)
        ),
        "pgd": lambda: ap.pgd(LEARNING_RATE, NOISE_STD, key, momentum=MOMENTUM),
        "anti_pgd": lambda: ap.anti_pgd(
            LEARNING_RATE, NOISE_STD, key, momentum=MOMENTUM
        ),
        "anti_pgd(store_noise=False)": lambda: ap.anti_pgd(
            LEARNING_RATE, NOISE_STD, key, momentum=MOMENTUM, store_noise=False
        ),
        "anti_pgd(rademacher)": lambda: ap.anti_pgd(
            LEARNING_RATE, NOISE_STD, key, momentum=MOMENTUM, distribution="rademacher"
        ),
        "anti_pgd(noise off)": lambda: ap.anti_pgd(
            LEARNING_RATE, switched_off, key, momentum=MOMENTUM
        ),
        "fractional_pgd(hurst=0.25)": lambda: ap.fractional_pgd(
            LEARNING_RATE, NOISE_STD, key, hurst=0.25, momentum=MOMENTUM
        ),
        "adamw": lambda: optax.adamw(1e-3),
        "adamw+anti_pgd": lambda: optax.chain(
            optax.adamw(1e-3), ap.add_anticorrelated_noise(NOISE_STD, key)
        ),
        "sam": lambda: optax.contrib.sam(
            sgd(),
            optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
            opaque_mode=True,
        ),
    }


# --- Models: params from a key, a batch from a key, the loss of both ----------


@dataclasses.dataclass(frozen=True)
class Model:
    title: str
    init: Callable[[jax.Array], Any]  # key -> params
    batch: Callable[[jax.Array], Any]  # key -> one synthetic batch
    loss: Callable[[Any, Any], jax.Array]  # (params, batch) -> scalar


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def dense(key, fan_in, fan_out, scale=1.0):
    kernel = jax.random.normal(key, (fan_in, fan_out)) * (scale / fan_in) ** 0.5
    return {"kernel": kernel, "bias": jnp.zeros(fan_out)}


def mlp(widths=(784, 1024, 1024, 10), batch_size=128) -> Model:
    def init(key):
        shapes = zip(widths[:-1], widths[1:], strict=True)
        keys = jax.random.split(key, len(widths) - 1)
        return [dense(k, *shape, 2.0) for k, shape in zip(keys, shapes, strict=True)]

    def loss(params, batch):
        h, labels = batch
        for layer in params[:-1]:
            h = jax.nn.relu(h @ layer["kernel"] + layer["bias"])
        return cross_entropy(h @ params[-1]["kernel"] + params[-1]["bias"], labels)

    def batch(key):
        kx, ky = jax.random.split(key)
        x = jax.random.normal(kx, (batch_size, widths[0]))
        return x, jax.random.randint(ky, (batch_size,), 0, widths[-1])

    title = f"MLP {'-'.join(map(str, widths))}, batch {batch_size}"
    return Model(title, init, batch, loss)


def transformer(
    layers=4, d_model=256, heads=4, d_mlp=1024, seq=128, batch_size=8, vocab=1024
) -> Model:
    def layer_norm(params, x):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-6) * params["scale"] + params["bias"]

    def norm():
        return {"scale": jnp.ones(d_model), "bias": jnp.zeros(d_model)}

    def init(key):
        keys = jax.random.split(key, 2 + 4 * layers)
        blocks = [
            {
                "norm1": norm(),
                "qkv": dense(keys[2 + 4 * i], d_model, 3 * d_model),
                "out": dense(keys[3 + 4 * i], d_model, d_model),
                "norm2": norm(),
                "up": dense(keys[4 + 4 * i], d_model, d_mlp),
                "down": dense(keys[5 + 4 * i], d_mlp, d_model),
            }
            for i in range(layers)
        ]
        return {
            "embed": 0.02 * jax.random.normal(keys[0], (vocab, d_model)),
            "position": 0.02 * jax.random.normal(keys[1], (seq, d_model)),
            "blocks": blocks,
            "norm": norm(),
        }

    def apply(layer, x):
        return x @ layer["kernel"] + layer["bias"]

    def loss(params, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        x = params["embed"][inputs] + params["position"]
        for block in params["blocks"]:
            qkv = apply(block["qkv"], layer_norm(block["norm1"], x))
            q, k, v = jnp.moveaxis(qkv.reshape(*x.shape[:2], 3, heads, -1), 2, 0)
            attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            x = x + apply(block["out"], attended.reshape(x.shape))
            h = jax.nn.gelu(apply(block["up"], layer_norm(block["norm2"], x)))
            x = x + apply(block["down"], h)
        logits = layer_norm(params["norm"], x) @ params["embed"].T
        return cross_entropy(logits, targets)

    def batch(key):
        return jax.random.randint(key, (batch_size, seq + 1), 0, vocab)

    title = (
        f"decoder-only transformer, {layers} layers, d_model {d_model}, {heads} "
        f"heads, MLP {d_mlp}, seq {seq}, vocab {vocab}, batch {batch_size}"
    )
    return Model(title, init, batch, loss)


def example_task(module_name, title, input_shape, batch_size) -> Model:
    """The network of one of ``examples/``' tasks, on random normal inputs."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    task = importlib.import_module(module_name).TASK

    def loss(params, batch):
        x, labels = batch
        return cross_entropy(task.logits_fn(params, x), labels)

    def batch(key):
        kx, ky = jax.random.split(key)
        x = jax.random.normal(kx, (batch_size, *input_shape))
        return x, jax.random.randint(ky, (batch_size,), 0, 10)

    return Model(f"{title}, batch {batch_size}", task.init_params, batch, loss)


def models(quick: bool) -> dict[str, Callable[[], Model]]:
    if quick:  # a smoke run: the same code on tiny sizes
        return {
            "mlp": lambda: mlp((784, 32, 32, 10), batch_size=8),
            "transformer": lambda: transformer(1, 32, 2, 64, 16, 2, 64),
            "mnist1d": lambda: example_task(
                "mnist1d_experiments", "MNIST-1D CNN", (40,), 8
            ),
            "mnist": lambda: example_task(
                "mnist_experiments", "MNIST 2-D CNN", (28, 28), 8
            ),
        }
    return {
        "mlp": mlp,
        "transformer": transformer,
        "mnist1d": lambda: example_task(
            "mnist1d_experiments",
            "MNIST-1D CNN (examples/mnist1d_experiments.py)",
            (40,),
            64,
        ),
        "mnist": lambda: example_task(
            "mnist_experiments",
            "MNIST 2-D CNN (examples/mnist_experiments.py)",
            (28, 28),
            64,
        ),
    }


# --- Timing -------------------------------------------------------------------


def training_step(opt, loss_fn, needs_grad_fn):
    """The jitted function: loss and gradient, the update, the new params."""
    value_and_grad = jax.value_and_grad(loss_fn)

    def step(params, state, batch):
        loss, grads = value_and_grad(params, batch)
        extra = {}
        if needs_grad_fn:  # SAM's ascent: the gradient at other params, same batch
            extra["grad_fn"] = lambda p, _: jax.grad(loss_fn)(p, batch)
        updates, state = opt.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state, loss

    return step


class Candidate(Timed):
    """One optimizer on one model: its compiled step and its live buffers."""

    def __init__(self, name, make_opt, model, params, batch):
        self.name = name
        self.make_opt = make_opt
        self.loss_fn = model.loss
        self.params = params
        self.state = jax.jit(make_opt().init)(params)
        self.batch = batch
        self.loss = None
        self.compile_times = []
        self.times = []
        self.compile()

    def compile(self):
        """Lowers and compiles the step of a fresh optimizer: no cache to hit."""
        step = training_step(self.make_opt(), self.loss_fn, self.name in NEEDS_GRAD_FN)
        start = time.perf_counter()
        self.compiled = (
            jax.jit(step, donate_argnums=(0, 1))
            .lower(self.params, self.state, self.batch)
            .compile()
        )
        self.compile_times.append(time.perf_counter() - start)

    def call(self):
        self.params, self.state, self.loss = self.compiled(
            self.params, self.state, self.batch
        )
        jax.block_until_ready((self.params, self.state, self.loss))

    @property
    def compile_s(self):
        return statistics.median(self.compile_times)


def run_model(model, repeats, warmup, compile_repeats, only=None):
    makers = {
        name: make
        for name, make in candidates().items()
        if only is None or name in only or name in PEERS
    }
    init = jax.jit(model.init)
    batch = jax.block_until_ready(jax.jit(model.batch)(jax.random.key(1)))
    # Fresh params for each candidate (they are donated), from the same key.
    runs = {
        name: Candidate(name, make, model, init(jax.random.key(0)), batch)
        for name, make in makers.items()
    }
    for _ in range(compile_repeats - 1):  # interleaved as well
        for run in runs.values():
            run.compile()
    for run in runs.values():
        for _ in range(warmup):
            run.call()
    order = list(runs.values())
    for round_ in range(repeats):
        # Rotate the order so no candidate always follows the same one.
        shift = round_ % len(order)
        for run in order[shift:] + order[:shift]:
            run.timed_call()
    return runs, num_params(jax.eval_shape(model.init, jax.random.key(0)))


def rows(runs) -> list[dict[str, Any]]:
    sgd, peer = runs["sgd"].step_s, runs["sgd+add_noise"].step_s
    return [
        {
            "candidate": run.name,
            "step_ms": run.step_s * 1e3,
            "x_sgd": run.step_s / sgd,
            "x_sgd+add_noise": run.step_s / peer,
            "compile_s": run.compile_s,
            "compile_times_s": run.compile_times,
            "final_loss": float(run.loss),
            "times_ms": [t * 1e3 for t in run.times],
        }
        for run in runs.values()
    ]


def table(model_rows) -> str:
    lines = [
        "| candidate | step (ms) | x sgd | x sgd+add_noise | compile (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in model_rows:
        lines.append(
            f"| {row['candidate']} | {row['step_ms']:.2f} | {row['x_sgd']:.2f} "
            f"| {row['x_sgd+add_noise']:.2f} | {row['compile_s']:.2f} |"
        )
    return "\n".join(lines)


def run_threads(args, reps):
    """The MLP's rows in subprocesses pinned to one core and to all, alternately."""
    usable = sorted(os.sched_getaffinity(0))
    pins = {"1": usable[:1], "all": usable}
    times = {pin: {name: [] for name in THREAD_CANDIDATES} for pin in pins}
    command = ["--models", "mlp", "--only", *THREAD_CANDIDATES]
    command += ["--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    command += ["--compile-repeats", str(args.compile_repeats)]
    command += ["--quick"] if args.quick else []
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "child.json")
        for _ in range(reps):
            for pin, cores in pins.items():
                # Pinned before jax starts: XLA sizes its thread pools by it.
                code = (
                    f"import os, runpy, sys; os.sched_setaffinity(0, {cores}); "
                    f"sys.argv = {[__file__, *command, '--json', path]}; "
                    "runpy.run_path(sys.argv[0], run_name='__main__')"
                )
                subprocess.run(
                    [sys.executable, "-c", code],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                result = json.loads(pathlib.Path(path).read_text())
                for row in result["models"]["mlp"]["rows"]:
                    if row["candidate"] in THREAD_CANDIDATES:
                        times[pin][row["candidate"]].extend(row["times_ms"])
    return [
        {
            "candidate": name,
            "one_core_ms": statistics.median(times["1"][name]),
            "all_cores_ms": statistics.median(times["all"][name]),
            "all/1": statistics.median(times["all"][name])
            / statistics.median(times["1"][name]),
            "cores": {"1": pins["1"], "all": pins["all"]},
        }
        for name in THREAD_CANDIDATES
    ]


def threads_table(thread_rows) -> str:
    cores = len(thread_rows[0]["cores"]["all"])
    lines = [
        f"| candidate | 1 core (ms) | {cores} cores (ms) | all / 1 |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in thread_rows:
        lines.append(
            f"| {row['candidate']} | {row['one_core_ms']:.2f} "
            f"| {row['all_cores_ms']:.2f} | {row['all/1']:.2f} |"
        )
    return "\n".join(lines)


# --- The report ---------------------------------------------------------------


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="*",
        default=None,
        choices=("mlp", "transformer", "mnist1d", "mnist"),
        help="a subset (default: all four; none with --threads: its table only)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="candidate names")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--compile-repeats", type=int, default=None)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run on tiny models"
    )
    parser.add_argument(
        "--threads",
        action="store_true",
        help="the MLP's sgd, sgd+add_noise, pgd, anti_pgd on 1 core and on all",
    )
    parser.add_argument(
        "--thread-repeats", type=int, default=None, help="subprocesses per pinning"
    )
    parser.add_argument("--output", default=None, help="markdown file to write")
    parser.add_argument("--json", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.only is not None:
        unknown = set(args.only) - set(candidates())
        if unknown:
            parser.error(f"unknown candidates {sorted(unknown)}")
    if args.threads and not hasattr(os, "sched_setaffinity"):
        parser.error("--threads needs os.sched_setaffinity (Linux)")
    if args.quick:
        defaults = {"rounds": 5, "warmup": 1, "compile_repeats": 1}
    else:
        defaults = {"rounds": 30, "warmup": 3, "compile_repeats": 2}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    selected = list(models(args.quick)) if args.models is None else args.models
    load_before = load()
    header = {
        "date": f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "machine": machine(),
        "versions": f"jax {jax.__version__}, jaxlib {jax.lib.__version__}, "
        f"optax {optax.__version__}, flax {version('flax')}, "
        f"optax_antipgd {ap.__version__}, python {platform.python_version()}",
        "command": shlex.join(["python", "benchmarks/train_step.py", *sys.argv[1:]]),
        "protocol": f"{args.rounds} interleaved rounds after {args.warmup} warm-up "
        f"calls; compile time: median of {args.compile_repeats}",
    }
    lines = [
        f"- date: {header['date']}",
        f"- machine: {header['machine']}",
        f"- {header['versions']}",
        f"- command: `{header['command']}`",
        f"- {header['protocol']}",
    ]
    print("\n".join(lines + [f"- load average (1/5/15 min) before: {load_before}"]))
    sys.stdout.flush()
    results = {"header": header, "models": {}}
    sections = []
    builders = models(args.quick)
    for index, name in enumerate(selected):
        model = builders[name]()
        before = load()
        runs, size = run_model(
            model, args.rounds, args.warmup, args.compile_repeats, args.only
        )
        model_rows = rows(runs)
        after = load()
        note = (
            "\n\nsam computes two gradients a step (one at the ascent point)."
            if "sam" in runs
            else ""
        )
        section = (
            f"### ({index + 1}) {model.title}: {size:,} float32 params\n\n"
            f"load average (1/5/15 min) before: {before}, after: {after}\n\n"
            f"{table(model_rows)}{note}\n"
        )
        print("\n" + section, flush=True)
        sections.append(section)
        results["models"][name] = {
            "title": model.title,
            "params": size,
            "load_before": before,
            "load_after": after,
            "rows": model_rows,
        }
    if args.threads:
        reps = args.thread_repeats or (1 if args.quick else 2)
        before = load()
        thread_rows = run_threads(args, reps)
        after = load()
        section = (
            f"### Threads: the MLP{' (quick sizes)' if args.quick else ''} "
            "pinned to 1 core and to all\n\n"
            f"{reps} subprocess(es) per pinning, alternately; medians of their "
            f"rounds. load average (1/5/15 min) before: {before}, after: {after}"
            f"\n\n{threads_table(thread_rows)}\n"
        )
        print("\n" + section, flush=True)
        sections.append(section)
        results["threads"] = {
            "repeats": reps,
            "load_before": before,
            "load_after": after,
            "rows": thread_rows,
        }
    header["load_before"], header["load_after"] = load_before, load()
    lines.append(
        f"- load average (1/5/15 min) before: {load_before}, "
        f"after: {header['load_after']}"
    )
    print(f"\nload average (1/5/15 min) after: {header['load_after']}")
    if args.output:
        pathlib.Path(args.output).write_text(
            "# Training-step benchmark\n\n"
            + "\n".join(lines)
            + "\n\n"
            + "\n".join(sections)
        )
        print(f"wrote {args.output}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
