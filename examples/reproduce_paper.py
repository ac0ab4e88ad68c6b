"""Reproduces the experiments of Orvieto et al. (ICML 2022) on a laptop.

Anticorrelated noise injection (Anti-PGD) finds flatter minima, and generalizes
better, than gradient descent (GD); uncorrelated noise (PGD) does worse. Four
experiments compare ``optax.sgd``, ``optax_antipgd.pgd`` and
``optax_antipgd.anti_pgd`` from the same initialization, with several noise
seeds trained at once (``jax.vmap`` inside one ``jax.jit``). The noise is in
parameter space, as in the paper, and a schedule switches it off for a final
clean phase, so Anti-PGD returns to its noise-free iterate.

1. Widening valley ``L(u, v) = v^2 |u|^2 / 2``: final ``Tr H = d v^2 + |u|^2``.
2. Quadratically parametrized sparse regression ``w = v * v``: test error.
3. Matrix sensing ``X = U U^T``: relative test error.
4. scikit-learn digits with a Flax NNX MLP (MSE loss): test accuracy and
   ``Tr H`` by :func:`optax_antipgd.hessian_trace`, with ``optax.noisy_sgd``
   and ``optax.contrib.sam`` as extra rows.

5. to 10. The paper's three deep-learning claims (large batch, a sharp
   start, minibatch "Anti-SGD"), with noise levels chosen on a validation
   split and SAM as a reference row (``section4.py`` beside this script), on
   two real datasets: MNIST-1D with a 1-D CNN (``mnist1d_experiments.py``)
   and MNIST digits with a 2-D CNN (``mnist_experiments.py``). A sweep of the
   noise's correlation (``mnist1d-correlation``, ``mnist-correlation``) runs
   when asked for.

Prints a markdown table per experiment and writes them (``results.md``; the
numbers in ``results.json``; how, where and when in ``run.json``), with PNG
figures, to ``--out`` (default ``results/``). ``--quick`` runs everything at
reduced size (a smoke run: its numbers mean nothing). ``--experiments`` runs a subset;
``--seed N`` adds N to every seed (inits, noise, batch orders, the toy data and
the validation split), for a re-run on seeds nobody chose settings on.

    python examples/reproduce_paper.py [--quick] [--out results/]
        [--experiments valley,digits,mnist1d-minibatch,...] [--seed N]
        [--loss ce|mse]
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import mnist1d_experiments
import mnist_experiments
import numpy as np
import optax
import section4
from flax import nnx
from sklearn.datasets import load_digits
from tqdm import tqdm

import optax_antipgd as ap

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

COLORS = {
    "GD": "tab:blue",
    "PGD": "tab:red",
    "Anti-PGD": "tab:green",
    "optax.noisy_sgd": "tab:purple",
    "optax.contrib.sam": "tab:orange",
}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    make: Callable[[jax.Array], optax.GradientTransformation]  # noise key -> opt


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A full-batch problem: the same init for every method, per seed."""

    name: str
    init: Callable[[jax.Array], Any]  # seed key -> params
    loss: Callable[[Any], jax.Array]  # params -> training loss
    metrics: Callable[[Any], dict[str, jax.Array]]  # params -> logged scalars
    methods: tuple[Method, ...]
    noisy_steps: int
    clean_steps: int
    chunk: int  # steps between two logged points
    num_seeds: int
    table: tuple[str, ...]  # metric names in the table, the first one is the goal
    reference: dict[str, str]  # method -> an independent prototype's value, if any
    exact_trace: bool = False  # whether metrics() gives Tr H exactly
    final_probes: int = 128  # Hutchinson probes for the final Tr H
    lanczos_steps: int = 0  # > 0: the final lambda_max, by that many steps
    block_traces: bool = False  # the final Tr H of each layer (a network)

    # Compiled once per experiment and shared by its methods (same params).
    @functools.cached_property
    def init_fn(self) -> Callable[[jax.Array], Any]:
        return jax.jit(jax.vmap(self.init))

    @functools.cached_property
    def log_fn(self) -> Callable[[Any], dict[str, jax.Array]]:
        return jax.jit(jax.vmap(self.metrics))

    @functools.cached_property
    def lambda_max_fn(self) -> Callable[[Any], jax.Array]:
        """The top Hessian eigenvalue at the final params of every seed."""
        return jax.jit(
            jax.vmap(
                lambda p: ap.hessian_eigenvalues(
                    self.loss, p, 11, k=1, num_matvecs=self.lanczos_steps
                )[0]
            )
        )

    @functools.cached_property
    def final_trace_fn(self) -> Callable[[Any], jax.Array]:
        """Tr H at the final params of every seed, with many probes (logs use few)."""
        return jax.jit(
            jax.vmap(
                lambda p: ap.hessian_trace(
                    self.loss, p, 7, num_samples=self.final_probes, batch_size=32
                )
            )
        )

    @functools.cached_property
    def layer_traces_fn(self) -> Callable[[Any], dict[str, jax.Array]]:
        """``"Tr H <layer>"`` at the final params, with the probes of the final Tr H."""
        return jax.jit(
            jax.vmap(
                lambda p: section4.layer_traces(
                    ap.hessian_block_traces(
                        self.loss, p, 7, num_samples=self.final_probes, batch_size=32
                    )
                )
            )
        )


def noise_schedule(noise_std: float, noisy_steps: int) -> optax.Schedule:
    """``noise_std`` for ``noisy_steps`` updates, then exactly 0."""
    return optax.join_schedules(
        [optax.constant_schedule(noise_std), optax.constant_schedule(0.0)],
        [noisy_steps],
    )


def paper_methods(lr: float, noise_std: float, noisy_steps: int) -> tuple:
    sigma = noise_schedule(noise_std, noisy_steps)
    return (
        Method("GD", lambda key: optax.sgd(lr)),
        Method("PGD", lambda key: ap.pgd(lr, sigma, key)),
        Method("Anti-PGD", lambda key: ap.anti_pgd(lr, sigma, key)),
    )


def train(
    experiment: Experiment, method: Method, seed: int
) -> tuple[dict[str, np.ndarray], Any]:
    """Trains every seed at once; returns each metric as [seeds, points].

    The metric "Tr H" at the last point is recomputed with many probes unless
    the experiment computes it exactly; "lambda_max" is the final one only.
    Also returns the final params, leaves [seeds, ...].
    """
    grad_fn = jax.grad(experiment.loss)
    keys = jax.random.split(jax.random.key(seed), experiment.num_seeds)
    init_keys, noise_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)

    def init(params, noise_key):
        return params, method.make(noise_key).init(params)

    def advance(carry, key):
        opt = method.make(jax.random.split(key)[1])

        def step(carry, _):
            params, state = carry
            # grad_fn is used by SAM (opaque mode) only; the others ignore it.
            updates, state = opt.update(
                grad_fn(params), state, params, grad_fn=lambda p, _: grad_fn(p)
            )
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, carry, length=experiment.chunk)[0]

    carry = jax.jit(jax.vmap(init))(experiment.init_fn(init_keys), noise_keys)
    advance = jax.jit(jax.vmap(advance), donate_argnums=0)
    logs = [jax.device_get(experiment.log_fn(carry[0]))]
    total = experiment.noisy_steps + experiment.clean_steps
    bar = tqdm(total=total, desc=f"{experiment.name}: {method.name}", leave=False)
    for _ in range(total // experiment.chunk):
        carry = advance(carry, keys)
        logs.append(jax.device_get(experiment.log_fn(carry[0])))
        bar.update(experiment.chunk)
    bar.close()
    logs = {
        name: np.stack([np.asarray(log[name]) for log in logs], axis=1)
        for name in logs[0]
    }
    if not experiment.exact_trace:
        logs["Tr H"][:, -1] = np.asarray(experiment.final_trace_fn(carry[0]))
    if experiment.lanczos_steps:
        logs["lambda_max"] = np.asarray(experiment.lambda_max_fn(carry[0]))[:, None]
    if experiment.block_traces:
        for name, value in experiment.layer_traces_fn(carry[0]).items():
            logs[name] = np.asarray(value)[:, None]
    return logs, carry[0]


# 1. The widening valley -----------------------------------------------------


def valley(quick: bool, shift: int) -> Experiment:
    del shift  # the same init for every seed and no data: nothing to shift
    dim, u_sq, v0 = 200, 100.0, 0.5
    noisy, clean = (10_000, 1_000) if quick else (100_000, 20_000)

    def init(key):
        del key  # the same init for every seed: only the noise differs
        return {"u": jnp.full((dim,), np.sqrt(u_sq / dim)), "v": jnp.asarray(v0)}

    def loss(params):
        return 0.5 * params["v"] ** 2 * jnp.sum(params["u"] ** 2)

    def metrics(params):
        u_sq = jnp.sum(params["u"] ** 2)
        return {
            "Tr H": dim * params["v"] ** 2 + u_sq,
            "‖u‖": jnp.sqrt(u_sq),
            "v": params["v"],
            "loss": loss(params),
        }

    return Experiment(
        name="valley",
        init=init,
        loss=loss,
        metrics=metrics,
        methods=paper_methods(5e-4, 0.15, noisy),
        noisy_steps=noisy,
        clean_steps=clean,
        chunk=1_000,
        num_seeds=2 if quick else 4,
        table=("Tr H", "‖u‖", "v"),
        reference={"GD": "100", "PGD": "3850", "Anti-PGD": "10 (theory 10.5)"},
        exact_trace=True,
    )


# 2. Sparse regression, w = v * v --------------------------------------------


def sparse_regression(quick: bool, shift: int) -> Experiment:
    dim, num_train, sparsity = 100, 40, 5
    noisy, clean = (10_000, 1_000) if quick else (100_000, 20_000)
    data_key = jax.random.key(1 + shift)
    x = jax.random.normal(data_key, (num_train, dim))
    support = jax.random.permutation(jax.random.fold_in(data_key, 1), dim)[:sparsity]
    w_star = jnp.zeros(dim).at[support].set(1.0)
    y = x @ w_star

    def loss(v):
        return jnp.sum((x @ (v * v) - y) ** 2) / (4 * num_train)

    def metrics(v):
        return {
            "test error": jnp.sum((v * v - w_star) ** 2),
            "train loss": loss(v),
            "Tr H": ap.hessian_trace(loss, v, 0, num_samples=16),
        }

    return Experiment(
        name="sparse_regression",
        init=lambda key: jnp.ones(dim),
        loss=loss,
        metrics=metrics,
        methods=paper_methods(0.02, 0.05, noisy),
        noisy_steps=noisy,
        clean_steps=clean,
        chunk=1_000 if quick else 4_000,
        num_seeds=2 if quick else 4,
        table=("test error", "train loss", "Tr H"),
        reference={"GD": "79", "PGD": "thousands", "Anti-PGD": "0.005"},
    )


# 3. Matrix sensing, X = U U^T -----------------------------------------------


def matrix_sensing(quick: bool, shift: int) -> Experiment:
    dim, rank, num_measurements = 20, 2, 160
    noisy, clean = (4_000, 1_000) if quick else (40_000, 10_000)
    data_key = jax.random.key(2 + shift)
    gaussian = jax.random.normal(data_key, (num_measurements, dim, dim))
    sensors = (gaussian + jnp.swapaxes(gaussian, 1, 2)) / 2
    u_star = jax.random.normal(jax.random.fold_in(data_key, 1), (dim, rank))
    x_star = u_star @ u_star.T / dim
    y = jnp.einsum("mij,ij->m", sensors, x_star)

    def loss(u):
        residual = jnp.einsum("mij,ij->m", sensors, u @ u.T) - y
        return jnp.sum(residual**2) / (4 * num_measurements)

    def metrics(u):
        error = jnp.linalg.norm(u @ u.T - x_star) / jnp.linalg.norm(x_star)
        return {
            "relative test error": error,
            "train loss": loss(u),
            "Tr H": ap.hessian_trace(loss, u, 0, num_samples=16),
        }

    return Experiment(
        name="matrix_sensing",
        init=lambda key: jnp.eye(dim),
        loss=loss,
        metrics=metrics,
        methods=paper_methods(0.02, 0.03, noisy),
        noisy_steps=noisy,
        clean_steps=clean,
        chunk=1_000 if quick else 2_000,
        num_seeds=2 if quick else 4,
        table=("relative test error", "train loss", "Tr H"),
        reference={"GD": "-", "PGD": "above GD", "Anti-PGD": "far below GD"},
    )


# 4. Digits with a Flax NNX MLP ----------------------------------------------


class MLP(nnx.Module):
    """64-128-10 tanh perceptron."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 128, rngs=rngs)
        self.out = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def digits(quick: bool, shift: int) -> Experiment:
    num_train, lr, noise_std = 400, 0.2, 0.01
    noisy, clean = (200, 100) if quick else (4_000, 1_000)
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(shift).permutation(len(labels))
    images, labels = images[order].astype(np.float32), labels[order]
    mean, std = images[:num_train].mean(0), images[:num_train].std(0)
    images = (images - mean) / np.where(std > 0, std, 1.0)
    x_train, x_test = jnp.asarray(images[:num_train]), jnp.asarray(images[num_train:])
    y_train = jax.nn.one_hot(labels[:num_train], 10)
    test_labels = jnp.asarray(labels[num_train:])
    graphdef, _ = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)

    def init(key):
        return nnx.split(MLP(nnx.Rngs(key)), nnx.Param)[1]

    def apply(params, x):
        return nnx.merge(graphdef, params)(x)

    def loss(params):
        # MSE on one-hot targets: with cross-entropy, noise can lower Tr H by
        # inflating the logits, which says nothing about flatness.
        return 0.5 * jnp.mean(jnp.sum((apply(params, x_train) - y_train) ** 2, -1))

    def metrics(params):
        predictions = jnp.argmax(apply(params, x_test), axis=-1)
        return {
            "test accuracy %": 100 * jnp.mean(predictions == test_labels),
            "train loss": loss(params),
            "Tr H": ap.hessian_trace(loss, params, 0, num_samples=8),
        }

    methods = (
        *paper_methods(lr, noise_std, noisy),
        # optax's peers: gradient noise of the same initial size in parameter
        # space (variance eta = (sigma / lr)^2, annealed as optax does) ...
        Method(
            "optax.noisy_sgd",
            lambda key: optax.noisy_sgd(lr, eta=(noise_std / lr) ** 2, key=key),
        ),
        # ... and sharpness-aware minimization (two gradients per step).
        Method(
            "optax.contrib.sam",
            lambda key: optax.contrib.sam(
                optax.sgd(lr),
                optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
                opaque_mode=True,
            ),
        ),
    )
    return Experiment(
        name="digits",
        init=init,
        loss=loss,
        metrics=metrics,
        methods=methods,
        noisy_steps=noisy,
        clean_steps=clean,
        chunk=100 if quick else 250,
        num_seeds=2 if quick else 3,
        final_probes=32 if quick else 128,
        lanczos_steps=4 if quick else 32,
        block_traces=True,
        table=("test accuracy %", "train loss", "Tr H", "lambda_max"),
        reference={"GD": "93.2%, Tr H ~800", "PGD": "88%", "Anti-PGD": "95.4%, ~600"},
    )


# Reporting -------------------------------------------------------------------


def markdown_table(experiment: Experiment, results: dict) -> str:
    header = ["method", *experiment.table, "reference"]
    rows = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    fmt = section4.fmt
    for name, logs in results.items():
        cells = [name]
        for metric in experiment.table:
            final = logs[metric][:, -1]
            cells.append(f"{fmt(final.mean())} ± {fmt(final.std())}")
        cells.append(experiment.reference.get(name, "-"))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


@section4.one_figure_at_a_time
def plot_curves(experiment: Experiment, results: dict, out: pathlib.Path) -> None:
    """The goal metric and Tr H over steps (the valley: Tr H and the trajectory)."""
    goal = experiment.table[0]
    panels = (goal, "Tr H") if goal != "Tr H" else (goal, "trajectory")
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    for ax, panel in zip(axes, panels, strict=True):
        for name, logs in results.items():
            if panel == "trajectory":
                ax.plot(logs["‖u‖"][0], logs["v"][0], color=COLORS[name], label=name)
                ax.plot(logs["‖u‖"][0, -1], logs["v"][0, -1], "o", color=COLORS[name])
                continue
            steps = np.arange(logs[panel].shape[1]) * experiment.chunk
            mean, std = logs[panel].mean(0), logs[panel].std(0)
            ax.plot(steps, mean, color=COLORS[name], label=name)
            ax.fill_between(
                steps, mean - std, mean + std, color=COLORS[name], alpha=0.2
            )
        if panel == "trajectory":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("‖u‖ (seed 0; dot: the end)")
            ax.set_ylabel("v")
            continue
        ax.axvline(experiment.noisy_steps, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("step (noise off after the dashed line)")
        ax.set_ylabel(panel + (" (mean ± std over seeds)" if panel == goal else ""))
        if panel != "test accuracy %":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(experiment.name)
    fig.tight_layout()
    fig.savefig(out / f"{experiment.name}.png", dpi=90)


def hessian_spectra(
    experiment: Experiment, params: dict[str, Any], quick: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """SLQ nodes and weights at the end of training (seed 0), per paper method."""
    spectrum = jax.jit(
        lambda p: ap.hessian_spectrum(
            experiment.loss,
            p,
            3,
            num_matvecs=8 if quick else 80,
            num_samples=2 if quick else 8,
        )
    )
    return {
        name: jax.device_get(spectrum(jax.tree.map(lambda leaf: leaf[0], params[name])))
        for name in ("GD", "PGD", "Anti-PGD")
    }


@section4.one_figure_at_a_time
def plot_spectrum(experiment: Experiment, spectra: dict, out: pathlib.Path) -> None:
    """The spectral densities of :func:`hessian_spectra`, smoothed."""
    fig = Figure(figsize=(6, 3.4))
    ax = fig.subplots()
    for name, (nodes, weights) in spectra.items():
        nodes, weights = np.ravel(nodes), np.ravel(weights)
        grid = np.linspace(nodes.min() - 1, nodes.max() + 1, 1024)
        # Gaussians of 1% of the range: resolves the outliers and the bulk.
        width = 0.01 * (nodes.max() - nodes.min())
        kernel = np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / width) ** 2)
        density = kernel @ weights / (width * np.sqrt(2 * np.pi))
        ax.semilogy(grid, np.maximum(density, 1e-6), color=COLORS[name], label=name)
        ax.axvline(nodes.max(), color=COLORS[name], lw=0.8, ls=":")
    ax.set_ylim(bottom=1e-5)
    ax.set_xlabel("Hessian eigenvalue (dotted: the largest node)")
    ax.set_ylabel("density (SLQ, smoothed)")
    ax.legend(fontsize=8)
    ax.set_title(f"{experiment.name}: Hessian spectrum at the end of training")
    fig.tight_layout()
    fig.savefig(out / f"{experiment.name}_spectrum.png", dpi=90)


TOY_EXPERIMENTS = {
    "valley": valley,
    "sparse_regression": sparse_regression,
    "matrix_sensing": matrix_sensing,
    "digits": digits,
}
TASKS = {
    name: (task.TASK, experiment)
    for task in (mnist1d_experiments, mnist_experiments)
    for name, experiment in task.EXPERIMENTS.items()
}
EXPERIMENTS = (*TOY_EXPERIMENTS, *TASKS)
# The main job: every experiment but the correlation sweeps (run on request).
DEFAULT_EXPERIMENTS = [
    name for name in EXPERIMENTS if not name.endswith("-correlation")
]


def run_toy(name: str, args: argparse.Namespace) -> tuple[str, dict]:
    """Trains a toy experiment's methods; returns its markdown and summary."""
    experiment = TOY_EXPERIMENTS[name](args.quick, args.seed)
    experiment_start = time.perf_counter()
    results, params = {}, {}
    for method in experiment.methods:
        results[method.name], params[method.name] = train(
            experiment, method, seed=2022 + args.seed
        )
    if name == "digits":
        plot_spectrum(
            experiment, hessian_spectra(experiment, params, args.quick), args.out
        )
    plot_curves(experiment, results, args.out)
    steps = f"{experiment.noisy_steps} noisy + {experiment.clean_steps} clean"
    title = (
        f"## {experiment.name} ({steps} steps, {experiment.num_seeds} seeds, "
        f"{time.perf_counter() - experiment_start:.0f} s)"
    )
    reported = [*experiment.table]
    markdown = markdown_table(experiment, results)
    if experiment.block_traces:
        layers = {
            method_name: {m: logs[m][:, -1] for m in logs if m.startswith("Tr H ")}
            for method_name, logs in results.items()
        }
        reported += list(next(iter(layers.values())))
        markdown += (
            "\n\nTr H by layer (block traces, with the probes of the final Tr H):"
            f"\n\n{section4.layer_table(layers)}"
        )
    summary = {
        method_name: section4.summarize({m: logs[m][:, -1] for m in reported})
        for method_name, logs in results.items()
    }
    return f"{title}\n\n{markdown}", summary


def run_task(name: str, args: argparse.Namespace) -> tuple[str, dict]:
    experiment_start = time.perf_counter()
    task, experiment = TASKS[name]
    outcome = experiment(section4.Run(task, args.quick, args.seed, args.loss, args.out))
    seconds = f"{time.perf_counter() - experiment_start:.0f} s"
    return f"{outcome.title[:-1]}, {seconds})\n\n{outcome.body}", outcome.summary


def run(name: str, args: argparse.Namespace) -> tuple[str, dict, float]:
    """The experiment's markdown, its summary and its wall time in seconds."""
    start = time.perf_counter()
    markdown, summary = (run_toy if name in TOY_EXPERIMENTS else run_task)(name, args)
    return markdown, summary, time.perf_counter() - start


def machine() -> str:
    """The CPU (or accelerator) the run used, in words."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1] for line in f if "model name" in line]
        cpu = models[0].strip() if models else cpu
    except OSError:
        pass
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    return f"{cpu}, {os.cpu_count()} cores; jax {jax.default_backend()} ({kind})"


def _experiment_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown experiment(s) {unknown or text!r}; choose from "
            + ", ".join(EXPERIMENTS)
        )
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced size, for CI")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results"))
    parser.add_argument(
        "--experiments",
        type=_experiment_names,
        default=DEFAULT_EXPERIMENTS,
        metavar="NAME[,NAME...]",
        help="the experiments to run, in this order (default: all but the "
        "correlation sweeps): " + ", ".join(EXPERIMENTS),
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="added to every seed (inits, noise, batch orders, toy data, the "
        "validation splits of MNIST-1D and MNIST)",
    )
    parser.add_argument(
        "--loss",
        "--mnist1d-loss",
        dest="loss",
        choices=tuple(section4.LOSSES),
        default="ce",
        help="the training loss of MNIST-1D and MNIST: cross-entropy or MSE on "
        "one-hot targets (--mnist1d-loss: the same flag)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        # A smoke run is mostly compilation: skip LLVM's optimizations (read
        # when the first computation starts the backend, which is still to come).
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
        )

    start = time.perf_counter()
    report = [f"# Anti-PGD reproduction ({'quick' if args.quick else 'full'} run)"]
    summary, seconds = {}, {}
    if args.quick:
        # A smoke run is mostly compilation, which XLA does outside Python's
        # lock: the toy problems and MNIST-1D run side by side, two threads.
        lanes = [
            [name for name in args.experiments if name in TOY_EXPERIMENTS],
            [name for name in args.experiments if name not in TOY_EXPERIMENTS],
        ]
        with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
            futures = [
                pool.submit(lambda lane=lane: [run(name, args) for name in lane])
                for lane in lanes
            ]
            done = {
                name: outcome
                for lane, future in zip(lanes, futures, strict=True)
                for name, outcome in zip(lane, future.result(), strict=True)
            }
        outcomes = ((name, done[name]) for name in args.experiments)
    else:
        outcomes = ((name, run(name, args)) for name in args.experiments)
    for name, (markdown, experiment_summary, experiment_seconds) in outcomes:
        print(f"\n{markdown}\n", flush=True)
        report.append(markdown)
        summary[name] = experiment_summary
        seconds[name] = round(experiment_seconds, 1)
    total_seconds = time.perf_counter() - start
    total = f"Total wall time: {total_seconds:.0f} s"
    print(total)
    report.append(total)
    (args.out / "results.md").write_text("\n\n".join(report) + "\n")
    # Per experiment, method and metric: the final mean ("<metric>"), its std
    # over seeds ("<metric> std") and the seeds' values ("<metric> per seed").
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    # How, where and when the numbers were made.
    run_info = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("jax", "jaxlib", "optax", "flax", "optax_antipgd")
        },
        "python": platform.python_version(),
        "quick": args.quick,
        "seed": args.seed,
        "loss": args.loss,
        "seconds": seconds,
        "total_seconds": round(total_seconds, 1),
    }
    (args.out / "run.json").write_text(json.dumps(run_info, indent=1) + "\n")


if __name__ == "__main__":
    main()
