"""MNIST-1D: the paper's deep-learning claims, checked on a real benchmark.

Orvieto et al. (ICML 2022, Section 4) make three claims about real networks,
each checked here as an experiment of ``reproduce_paper.py``:

1. ``mnist1d-large-batch``: with large batches and momentum, Anti-PGD
   generalizes better than GD, and than PGD at any noise level, and ends in a
   flatter minimum.
2. ``mnist1d-sharp-start``: started from a minimum that GD converged to,
   Anti-PGD recovers flatness and accuracy; PGD does not.
3. ``mnist1d-minibatch``: anticorrelated noise on top of minibatch SGD
   ("Anti-SGD") improves on SGD, and on SGD with independent noise.

``mnist1d-correlation`` sweeps the noise between those laws in the minibatch
regime, at Anti-SGD's validated sigma: the anticorrelation ``c`` of
``xi_{n+1} - c xi_n`` (``ap.anti_pgd(correlation=c)``, all values in one
program), the Hurst exponent ``H`` of fractional noise (the 8-tap filter of
``ap.fractional_pgd(hurst=H)``, given to ``ap.add_correlated_noise`` so that
every ``H`` runs in one program), and noise on one layer at a time
(``leaves="cyclic"``) against all layers at once.

Data: MNIST-1D (Greydanus, 2020), generated offline by the ``mnist1d`` package
(``make_dataset(get_dataset_args())``: 4000 training and 1000 test signals of
length 40, 10 classes). Model: the MNIST-1D paper's CNN in Flax NNX, three
convolutions (25 channels, kernels 5/3/3, stride 2, padding 1, ReLU) and a
linear head: 5,210 parameters. Each convolution is strided slices and one
matmul: under ``jax.vmap`` over runs (every kernel batched),
``lax.conv_general_dilated`` becomes a grouped convolution, which ran 11x
slower on a 2-core CPU (77 ms against 6.7 ms per step and run at batch 1000,
20 runs vmapped; 3.4 ms against 0.54 ms at batch 64).

Protocol, fixed before any test accuracy was computed:

- Splits: 1000 of the 4000 training signals are held out for validation (a
  fixed permutation); steps see only the other 3000. Test signals decide
  nothing.
- Common settings, chosen for GD (SGD) alone on validation accuracy: loss
  cross-entropy (MSE on one-hot targets, ``--mnist1d-loss mse``, is run with
  the same protocol as a check), momentum 0.9, gradients clipped to global
  norm 1 (at initialization the full-batch gradient norm is 0.2 to 0.8). The
  learning rate is, from a grid of doublings, the one with the best mean
  validation accuracy of GD (SGD) over the 5 seeds among those at which no
  seed collapsed: large batch, cross-entropy 0.4 (of 0.05 to 1.6; 0.8
  collapsed a seed), MSE 0.2 (of 0.2 to 1.6; 0.8 collapsed two); minibatch
  0.1 for both (of 0.025 to 0.2, resp. 0.05 to 0.4). The continuation from the
  sharp minimum uses lr 0.05, for every method: in a calibration run, noise at
  lr 0.2 collapsed some seeds' ReLU networks to chance.
- Per method, one choice: its noise level sigma in {0.01, 0.03, 0.1}, the
  one with the best validation accuracy averaged over the seeds (ties: the
  smaller). Every grid point is trained (all sigmas and seeds of a method run
  at once, ``jax.vmap`` inside one ``jax.jit``); tables report test accuracy
  at the chosen sigma and, for the record, at every grid point.
- Noise in parameter space (``ap.pgd``, ``ap.anti_pgd``), constant for the
  noisy phase, then exactly 0 for the last quarter of the steps (a clean
  phase): Anti-PGD returns to its noise-free iterate, and every method
  ends on plain (S)GD steps.
- Seeds: 5; seed ``i`` fixes the initialization, the batch order and the
  noise, the same for every method (paired runs). Tables give mean ± std over
  seeds; each claim gets the per-seed differences (mean ± std) and the number
  of seeds favouring each side.
- At the end of each run: test accuracy, training loss (all 3000 signals),
  ``Tr H`` of the training loss on a fixed 1000 of the training signals
  (Hutchinson, 32 Rademacher probes, with the standard error of the
  estimate), ``lambda_max`` of the same Hessian (Lanczos, 20 steps) and the
  RMS of the logits: with cross-entropy, noise can lower ``Tr H`` by scaling
  the logits up rather than by finding a flatter region.

Sizes are the constants of :func:`settings`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import random
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optax_antipgd as ap

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

NUM_VALIDATION = 1000
NUM_CLASSES = 10
MOMENTUM = 0.9
CLIP_NORM = 1.0
SPLIT_SEED = 0
# Matplotlib is not thread-safe (text layout shares parser state), and
# reproduce_paper.py --quick runs experiments in two threads: figures are
# drawn one at a time.
PLOT_LOCK = threading.Lock()
COLORS = {
    "GD": "tab:blue",
    "SGD": "tab:blue",
    "PGD": "tab:red",
    "SGD+independent": "tab:red",
    "Anti-PGD": "tab:green",
    "Anti-SGD": "tab:green",
}

# Data -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
    """MNIST-1D split three ways; steps only ever see ``x_train``."""

    x_train: np.ndarray  # [3000, 40] float32
    y_train: np.ndarray  # [3000] int32
    x_val: np.ndarray  # [1000, 40], held out from the 4000 training signals
    y_val: np.ndarray
    x_test: np.ndarray  # [1000, 40], the benchmark's test set
    y_test: np.ndarray


def split_train_validation(
    num_examples: int, num_validation: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted index arrays (train, validation) covering ``num_examples``."""
    if not 0 < num_validation < num_examples:
        raise ValueError(
            f"num_validation must be in (0, {num_examples}), got {num_validation}."
        )
    order = np.random.default_rng(seed).permutation(num_examples)
    return np.sort(order[num_validation:]), np.sort(order[:num_validation])


@functools.cache
def load(split_seed: int = SPLIT_SEED) -> Data:
    """MNIST-1D as the package generates it offline, with a validation split."""
    import mnist1d.data  # imports pyplot: after matplotlib.use("Agg")

    # make_dataset reseeds Python's and numpy's global generators: restore them.
    saved = random.getstate(), np.random.get_state()
    try:
        dataset = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    train, val = split_train_validation(len(dataset["y"]), NUM_VALIDATION, split_seed)
    x, y = dataset["x"].astype(np.float32), dataset["y"].astype(np.int32)
    return Data(
        x_train=x[train],
        y_train=y[train],
        x_val=x[val],
        y_val=y[val],
        x_test=dataset["x_test"].astype(np.float32),
        y_test=dataset["y_test"].astype(np.int32),
    )


def batch_indices(
    seed: int, num_train: int, batch_size: int, num_steps: int
) -> np.ndarray:
    """Indices into the training split, ``[num_steps, batch_size]`` int32.

    Each epoch is a fresh permutation cut into ``num_train // batch_size``
    batches (the remainder is dropped); drawn up front, since a permutation
    per step inside the training loop cost several gradients.
    """
    rng = np.random.default_rng(seed)
    per_epoch = num_train // batch_size
    epochs = -(-num_steps // per_epoch)
    batches = [
        rng.permutation(num_train)[: per_epoch * batch_size].reshape(per_epoch, -1)
        for _ in range(epochs)
    ]
    return np.concatenate(batches)[:num_steps].astype(np.int32)


# Model ------------------------------------------------------------------------


class Conv1d(nnx.Module):
    """A 1-D convolution, channels last, as strided slices and one matmul.

    The same parameters and numbers as ``nnx.Conv`` with ``padding=[(p, p)]``
    (kernel ``[kernel_size, in, out]``, LeCun-normal, zero bias), but fast
    under ``jax.vmap`` over runs on a CPU, where a batched kernel turns the
    XLA convolution into a slow grouped one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int,
        padding: int,
        rngs: nnx.Rngs,
    ):
        shape = (kernel_size, in_features, out_features)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros(out_features))
        self.stride, self.padding = stride, padding

    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, length, in]
        kernel_size, _, out_features = self.kernel.shape
        x = jnp.pad(x, ((0, 0), (self.padding, self.padding), (0, 0)))
        length = (x.shape[1] - kernel_size) // self.stride + 1
        end = self.stride * (length - 1) + 1
        patches = jnp.concatenate(
            [x[:, j : j + end : self.stride] for j in range(kernel_size)], axis=-1
        )
        kernel = self.kernel[...].reshape(-1, out_features)
        return patches @ kernel + self.bias[...]


class CNN(nnx.Module):
    """The MNIST-1D paper's CNN: 3 convolutions of 25 channels, a linear head."""

    def __init__(self, rngs: nnx.Rngs, channels: int = 25):
        self.conv1 = Conv1d(1, channels, 5, stride=2, padding=1, rngs=rngs)
        self.conv2 = Conv1d(channels, channels, 3, stride=2, padding=1, rngs=rngs)
        self.conv3 = Conv1d(channels, channels, 3, stride=2, padding=1, rngs=rngs)
        self.head = nnx.Linear(5 * channels, NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, 40] -> logits
        h = x[..., None]
        for conv in (self.conv1, self.conv2, self.conv3):
            h = jax.nn.relu(conv(h))
        return self.head(h.reshape(h.shape[0], -1))


# Abstract: building a real model here would compile its initializers.
_GRAPHDEF = nnx.split(nnx.eval_shape(lambda: CNN(nnx.Rngs(0))), nnx.Param)[0]


def init_params(key: jax.Array) -> Any:
    return nnx.split(CNN(nnx.Rngs(key)), nnx.Param)[1]


_init_params_program = jax.jit(jax.vmap(init_params))


def logits_fn(params: Any, x: jax.Array) -> jax.Array:
    return nnx.merge(_GRAPHDEF, params)(x)


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _mse(logits, labels):
    targets = jax.nn.one_hot(labels, NUM_CLASSES)
    return 0.5 * jnp.mean(jnp.sum((logits - targets) ** 2, axis=-1))


LOSSES = {"ce": _cross_entropy, "mse": _mse}
LOSS_NAMES = {"ce": "cross-entropy", "mse": "MSE"}


# Settings ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
    """One training regime: the same for every method of an experiment."""

    batch_size: int
    learning_rate: float
    noisy_steps: int
    clean_steps: int
    chunk: int  # steps between two logged points
    num_seeds: int

    @property
    def steps(self) -> int:
        return self.noisy_steps + self.clean_steps


@dataclasses.dataclass(frozen=True)
class Method:
    """A named optimizer family and its noise grid (``(0.0,)``: noise-free)."""

    name: str
    family: str  # a key of FAMILIES
    sigmas: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Settings:
    large_batch: Setting
    sharp_start: Setting  # continues from large_batch's GD
    minibatch: Setting
    sigmas: tuple[float, ...]  # the grid of every noisy method
    correlations: tuple[float, ...]
    hursts: tuple[float, ...]
    trace_probes: int
    lanczos_steps: int
    hessian_examples: int  # the training signals the Hessian is taken on
    num_taps: int  # of the fractional noise's filter


def settings(quick: bool, loss_name: str = "ce") -> Settings:
    """The sizes of every experiment; ``quick``: a smoke run, numbers meaningless.

    The learning rates were chosen for GD (SGD) alone, per loss, by the rule of
    the module docstring. The step counts let GD's (SGD's) validation accuracy
    reach its plateau (cross-entropy: after about 150 steps at batch 1000,
    1500 at batch 64), and keep the whole main job within about 12 minutes
    on a 2-core CPU.
    """
    if quick:
        # One batch size everywhere, so the three regimes share their compiled
        # programs; one sigma, two seeds, a few steps.
        tiny = Setting(64, 0.05, noisy_steps=6, clean_steps=2, chunk=4, num_seeds=2)
        return Settings(
            large_batch=tiny,
            sharp_start=tiny,
            minibatch=tiny,
            sigmas=(0.01,),
            # One point per sweep: the correlation sweep reuses Anti-SGD's program.
            correlations=(0.5,),
            hursts=(0.25,),
            trace_probes=4,
            lanczos_steps=4,
            hessian_examples=64,
            num_taps=2,
        )
    if loss_name == "ce":
        large_batch = Setting(
            1000, 0.4, noisy_steps=300, clean_steps=100, chunk=50, num_seeds=5
        )
    else:  # MSE learns more slowly and is unstable at 0.4 (see the docstring)
        large_batch = Setting(
            1000, 0.2, noisy_steps=900, clean_steps=300, chunk=100, num_seeds=5
        )
    return Settings(
        large_batch=large_batch,
        sharp_start=Setting(
            1000, 0.05, noisy_steps=240, clean_steps=80, chunk=40, num_seeds=5
        ),
        minibatch=Setting(
            64, 0.1, noisy_steps=1800, clean_steps=600, chunk=200, num_seeds=5
        ),
        sigmas=(0.01, 0.03, 0.1),
        correlations=(0.0, 0.25, 0.5, 0.75, 1.0),
        hursts=(0.1, 0.25, 0.4, 0.5),
        trace_probes=32,
        lanczos_steps=20,
        hessian_examples=1000,
        num_taps=8,
    )


# Optimizers -------------------------------------------------------------------


def _noise_schedule(noise_std: jax.Array, noisy_steps: jax.Array) -> optax.Schedule:
    """``noise_std`` for ``noisy_steps`` updates, then exactly 0 (both traced)."""
    return lambda count: jnp.where(count < noisy_steps, noise_std, 0.0)


def _noise_free(hyper, key):
    del key
    return optax.sgd(hyper["learning_rate"], momentum=MOMENTUM)


def _independent(hyper, key):
    sigma = _noise_schedule(hyper["noise_std"], hyper["noisy_steps"])
    return ap.pgd(hyper["learning_rate"], sigma, key, momentum=MOMENTUM)


def _anticorrelated(hyper, key):
    # ``correlation`` is traced: the sweep's values run in one program.
    sigma = _noise_schedule(hyper["noise_std"], hyper["noisy_steps"])
    return ap.anti_pgd(
        hyper["learning_rate"],
        sigma,
        key,
        momentum=MOMENTUM,
        correlation=hyper["correlation"],
    )


def _fractional(hyper, key):
    # ap.fractional_pgd takes a concrete hurst; its filter, traced, sweeps
    # every hurst in one program: the same transform, by definition.
    sigma = _noise_schedule(hyper["noise_std"], hyper["noisy_steps"])
    return optax.chain(
        optax.sgd(hyper["learning_rate"], momentum=MOMENTUM),
        ap.add_correlated_noise(sigma, key, coefficients=hyper["coefficients"]),
    )


def _cyclic(hyper, key):
    sigma = _noise_schedule(hyper["noise_std"], hyper["noisy_steps"])
    return ap.anti_pgd(
        hyper["learning_rate"], sigma, key, momentum=MOMENTUM, leaves="cyclic"
    )


FAMILIES: dict[str, Callable[[dict, jax.Array], optax.GradientTransformation]] = {
    "noise-free": _noise_free,
    "independent": _independent,
    "anticorrelated": _anticorrelated,
    "fractional": _fractional,
    "cyclic": _cyclic,
}


def make_optimizer(family: str, hyper: dict, key: jax.Array):
    """Clipping, then the family's optimizer (noise after the step: paper's law)."""
    return optax.chain(
        optax.clip_by_global_norm(CLIP_NORM), FAMILIES[family](hyper, key)
    )


# Compiled programs: one per (family, loss), shared by every experiment ---------
#
# Runs are laid out [grid, seed]: the grid axis carries the per-point
# hyperparameters (sigma, correlation, filter), the seed axis the init, the
# noise key and the batch order. The learning rate and the length of the
# noisy phase are traced, so the large-batch and sharp-start experiments
# share their programs.

_GRID_AXES = {
    "learning_rate": None,
    "noisy_steps": None,
    "noise_std": 0,
    "correlation": 0,
    "coefficients": 0,
}


def _grid_axes(hyper: dict) -> dict:
    return {name: _GRID_AXES[name] for name in hyper}


@functools.cache
def _init_program(family: str) -> Callable:
    def init_one(params, hyper, key):
        return make_optimizer(family, hyper, key).init(params)

    def init(params, hyper, keys):  # params [seed, ...] -> state [grid, seed, ...]
        per_seed = jax.vmap(init_one, in_axes=(0, None, 0))
        return jax.vmap(per_seed, in_axes=(None, _grid_axes(hyper), None))(
            params, hyper, keys
        )

    return jax.jit(init)


@functools.cache
def _advance_program(family: str, loss_name: str) -> Callable:
    loss = LOSSES[loss_name]

    def advance_one(params, state, hyper, key, batches, x, y):
        opt = make_optimizer(family, hyper, key)

        def step(carry, batch):
            params, state = carry
            grads = jax.grad(lambda p: loss(logits_fn(p, x[batch]), y[batch]))(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), batches)[0]

    def advance(carry, hyper, keys, batches, x, y):
        per_seed = jax.vmap(advance_one, in_axes=(0, 0, None, 0, 0, None, None))
        per_grid = jax.vmap(
            per_seed, in_axes=(0, 0, _grid_axes(hyper), None, None, None, None)
        )
        return per_grid(*carry, hyper, keys, batches, x, y)

    return jax.jit(advance, donate_argnums=0)


def _evaluate_one(params, data, *, loss):
    """Accuracies, training loss and logit scale of one run."""
    x_train, y_train, x_val, y_val, x_test, y_test = data
    train_logits = logits_fn(params, x_train)

    def accuracy(x, y):
        return 100 * jnp.mean(jnp.argmax(logits_fn(params, x), -1) == y)

    return {
        "val accuracy %": accuracy(x_val, y_val),
        "test accuracy %": accuracy(x_test, y_test),
        "train loss": loss(train_logits, y_train),
        "logits RMS": jnp.sqrt(jnp.mean(train_logits**2)),
    }


@functools.cache
def _evaluate_program(loss_name: str) -> Callable:
    loss = LOSSES[loss_name]
    one = functools.partial(_evaluate_one, loss=loss)
    return jax.jit(jax.vmap(jax.vmap(one, in_axes=(0, None)), in_axes=(0, None)))


@functools.cache
def _diagnostics_program(loss_name: str, trace_probes: int, lanczos_steps: int):
    """``Tr H`` with its standard error and ``lambda_max``, per seed."""
    loss = LOSSES[loss_name]

    def one(params, x, y):
        def objective(p):
            return loss(logits_fn(p, x), y)

        trace, stderr = ap.hessian_trace_with_stderr(
            objective, params, 0, num_samples=trace_probes, batch_size=8
        )
        # The same probes: the layers' traces sum to Tr H.
        blocks = ap.hessian_block_traces(
            objective, params, 0, num_samples=trace_probes, batch_size=8
        )
        top = ap.hessian_eigenvalues(
            objective, params, 1, k=1, num_matvecs=lanczos_steps
        )
        return {
            "Tr H": trace,
            "Tr H s.e.": stderr,
            "lambda_max": top[0],
            **layer_traces(blocks),
        }

    return jax.jit(jax.vmap(one, in_axes=(0, None, None)))


def layer_traces(blocks: Any) -> dict[str, jax.Array]:
    """``"Tr H <layer>"``: the block traces of a layer's leaves, summed.

    The layer of a leaf is the first key of its path (``conv1``, ``head``).
    """
    traces = {}
    for path, value in jax.tree_util.tree_flatten_with_path(blocks)[0]:
        name = f"Tr H {getattr(path[0], 'key', path[0])}"
        traces[name] = traces[name] + value if name in traces else value
    return traces


def layer_table(metrics: dict[str, dict]) -> str:
    """Method -> metrics with ``"Tr H <layer>"`` entries: a markdown table."""
    layers = [m for m in next(iter(metrics.values())) if m.startswith("Tr H ")]
    layers = [m for m in layers if m != "Tr H s.e."]
    names = [m.removeprefix("Tr H ") for m in layers]
    lines = [
        "| method | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    for method, values in metrics.items():
        cells = [_mean_std(values[m]) for m in layers]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Training ---------------------------------------------------------------------


@dataclasses.dataclass
class GridResult:
    """A method's runs, ``[grid, seed]``: curves, final metrics and params."""

    method: Method
    points: tuple[str, ...]  # one label per grid point
    curves: dict[str, np.ndarray]  # metric -> [grid, seed, logged points]
    final: dict[str, np.ndarray]  # metric -> [grid, seed]
    params: Any  # leaves [grid, seed, ...]
    chosen: int = 0  # grid index selected on validation accuracy


def _hyper(setting: Setting, grid: dict[str, np.ndarray]) -> dict:
    hyper = {
        "learning_rate": jnp.asarray(setting.learning_rate, jnp.float32),
        "noisy_steps": jnp.asarray(setting.noisy_steps, jnp.int32),
    }
    hyper.update(
        {name: jnp.asarray(value, jnp.float32) for name, value in grid.items()}
    )
    return hyper


def train_grid(
    method: Method,
    setting: Setting,
    data: Data,
    seeds: list[int],
    loss_name: str,
    *,
    start: Any = None,
    grid: dict[str, np.ndarray] | None = None,
    points: tuple[str, ...] | None = None,
    desc: str = "",
) -> GridResult:
    """Trains every (grid point, seed) of ``method`` at once.

    ``start``: params ``[seed, ...]`` to start from (default: the init of each
    seed). ``grid``: per-point hyperparameters (default: ``noise_std`` over
    ``method.sigmas``).
    """
    if grid is None:
        grid = {"noise_std": np.asarray(method.sigmas, np.float32)}
        points = tuple(f"sigma={s:g}" for s in method.sigmas)
    if method.family == "anticorrelated" and "correlation" not in grid:
        # Traced like the sweep's, so the sweep may reuse the program.
        grid = {**grid, "correlation": np.ones(len(method.sigmas), np.float32)}
    num_points = len(next(iter(grid.values())))
    keys = jnp.stack([jax.random.key(seed) for seed in seeds])
    init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    if start is None:
        start = _init_params_program(init_keys)
    hyper = _hyper(setting, grid)
    state = _init_program(method.family)(start, hyper, noise_keys)
    params = jax.tree.map(
        lambda leaf: jnp.broadcast_to(leaf, (num_points, *leaf.shape)), start
    )
    batches = np.stack(
        [
            batch_indices(seed, len(data.y_train), setting.batch_size, setting.steps)
            for seed in seeds
        ]
    )
    arrays = _arrays(data)
    advance = _advance_program(method.family, loss_name)
    evaluate = _evaluate_program(loss_name)
    logs = [jax.device_get(evaluate(params, arrays))]
    carry = (params, state)
    bar = tqdm(total=setting.steps, desc=desc or method.name, leave=False)
    for begin in range(0, setting.steps, setting.chunk):
        chunk = jnp.asarray(batches[:, begin : begin + setting.chunk])
        carry = advance(carry, hyper, noise_keys, chunk, *arrays[:2])
        logs.append(jax.device_get(evaluate(carry[0], arrays)))
        bar.update(chunk.shape[1])
    bar.close()
    final = {name: np.asarray(value) for name, value in logs[-1].items()}
    # Curves of what selection may look at; test accuracy only at the end.
    curves = {
        name: np.stack([np.asarray(log[name]) for log in logs], axis=-1)
        for name in ("val accuracy %", "train loss")
    }
    result = GridResult(method, points, curves, final, carry[0])
    result.chosen = choose(final["val accuracy %"])
    return result


def choose(val_accuracy: np.ndarray) -> int:
    """The grid point with the best mean validation accuracy; ties: the first."""
    mean = np.nan_to_num(np.asarray(val_accuracy, np.float64), nan=-1.0).mean(-1)
    return int(np.flatnonzero(mean == mean.max())[0])


def diagnose(result: GridResult, data: Data, loss_name: str, sizes: Settings) -> dict:
    """Final metrics of the chosen grid point, per seed, with the Hessian's."""
    chosen = jax.tree.map(lambda leaf: leaf[result.chosen], result.params)
    metrics = {name: value[result.chosen] for name, value in result.final.items()}
    metrics.update(hessian_metrics(chosen, data, loss_name, sizes))
    return metrics


def hessian_metrics(params: Any, data: Data, loss_name: str, sizes: Settings) -> dict:
    """``Tr H``, its standard error and ``lambda_max`` of each seed's params."""
    program = _diagnostics_program(loss_name, sizes.trace_probes, sizes.lanczos_steps)
    examples = slice(0, sizes.hessian_examples)
    x, y = jnp.asarray(data.x_train[examples]), jnp.asarray(data.y_train[examples])
    return {
        name: np.asarray(value)
        for name, value in jax.device_get(program(params, x, y)).items()
    }


def _arrays(data: Data) -> tuple[jax.Array, ...]:
    return tuple(
        jnp.asarray(a)
        for a in (
            data.x_train,
            data.y_train,
            data.x_val,
            data.y_val,
            data.x_test,
            data.y_test,
        )
    )


# Experiments ------------------------------------------------------------------

TABLE = (
    "test accuracy %",
    "val accuracy %",
    "train loss",
    "Tr H",
    "Tr H s.e.",
    "lambda_max",
    "logits RMS",
)


@dataclasses.dataclass
class Outcome:
    """What an experiment reports (its figure is already written)."""

    title: str  # a markdown heading that ends with ")"
    body: str  # markdown tables
    summary: dict  # method -> metric -> value (means, stds, per seed)


def _seeds(num_seeds: int, shift: int) -> list[int]:
    return [2022 + shift + i for i in range(num_seeds)]


def _noisy_methods(names: tuple[str, str, str], sigmas) -> tuple[Method, ...]:
    return (
        Method(names[0], "noise-free", (0.0,)),
        Method(names[1], "independent", tuple(sigmas)),
        Method(names[2], "anticorrelated", tuple(sigmas)),
    )


def _run_methods(
    experiment: str,
    methods,
    setting: Setting,
    data: Data,
    seeds,
    loss_name: str,
    sizes: Settings,
    start=None,
) -> dict[str, tuple[GridResult, dict]]:
    results = {}
    for method in methods:
        grid = train_grid(
            method,
            setting,
            data,
            seeds,
            loss_name,
            start=start,
            desc=f"{experiment}: {method.name}",
        )
        results[method.name] = (grid, diagnose(grid, data, loss_name, sizes))
    return results


# GD's final params per (seeds, loss, quick): the sharp start reuses them.
_GD_ENDS: dict[tuple, Any] = {}


def _large_batch_results(data, seeds, loss_name, sizes, quick):
    methods = _noisy_methods(("GD", "PGD", "Anti-PGD"), sizes.sigmas)
    results = _run_methods(
        "mnist1d-large-batch", methods, sizes.large_batch, data, seeds, loss_name, sizes
    )
    gd = results["GD"][0]
    _GD_ENDS[(tuple(seeds), loss_name, quick)] = jax.tree.map(
        lambda leaf: leaf[0], gd.params
    )
    return results


def large_batch(quick: bool, shift: int, loss_name: str, out: pathlib.Path):
    sizes = settings(quick, loss_name)
    data = load(SPLIT_SEED + shift)
    seeds = _seeds(sizes.large_batch.num_seeds, shift)
    results = _large_batch_results(data, seeds, loss_name, sizes, quick)
    comparisons = [("Anti-PGD", "GD"), ("Anti-PGD", "PGD"), ("PGD", "GD")]
    return _report(
        "mnist1d-large-batch", sizes.large_batch, results, comparisons, out, loss_name
    )


def sharp_start(quick: bool, shift: int, loss_name: str, out: pathlib.Path):
    sizes = settings(quick, loss_name)
    data = load(SPLIT_SEED + shift)
    seeds = _seeds(sizes.sharp_start.num_seeds, shift)
    cache_key = (tuple(seeds), loss_name, quick)
    if cache_key not in _GD_ENDS:
        gd = Method("GD", "noise-free", (0.0,))
        result = train_grid(
            gd, sizes.large_batch, data, seeds, loss_name, desc="sharp start: GD"
        )
        _GD_ENDS[cache_key] = jax.tree.map(lambda leaf: leaf[0], result.params)
    start = _GD_ENDS[cache_key]
    start_grid = jax.tree.map(lambda leaf: leaf[None], start)
    evaluated = _evaluate_program(loss_name)(start_grid, _arrays(data))
    start_metrics = {
        name: np.asarray(value[0]) for name, value in jax.device_get(evaluated).items()
    }
    start_metrics.update(hessian_metrics(start, data, loss_name, sizes))
    methods = _noisy_methods(("GD", "PGD", "Anti-PGD"), sizes.sigmas)
    results = _run_methods(
        "mnist1d-sharp-start",
        methods,
        sizes.sharp_start,
        data,
        seeds,
        loss_name,
        sizes,
        start=start,
    )
    comparisons = [("Anti-PGD", "GD"), ("Anti-PGD", "PGD"), ("Anti-PGD", "start")]
    return _report(
        "mnist1d-sharp-start",
        sizes.sharp_start,
        results,
        comparisons,
        out,
        loss_name,
        start=start_metrics,
    )


# Anti-SGD's validated sigma per (seeds, loss, quick): the sweep's noise level.
_ANTI_SGD_SIGMA: dict[tuple, float] = {}


def _minibatch_results(data, seeds, loss_name, sizes, quick):
    methods = _noisy_methods(("SGD", "SGD+independent", "Anti-SGD"), sizes.sigmas)
    results = _run_methods(
        "mnist1d-minibatch", methods, sizes.minibatch, data, seeds, loss_name, sizes
    )
    anti = results["Anti-SGD"][0]
    _ANTI_SGD_SIGMA[(tuple(seeds), loss_name, quick)] = anti.method.sigmas[anti.chosen]
    return results


def minibatch(quick: bool, shift: int, loss_name: str, out: pathlib.Path):
    sizes = settings(quick, loss_name)
    data = load(SPLIT_SEED + shift)
    seeds = _seeds(sizes.minibatch.num_seeds, shift)
    results = _minibatch_results(data, seeds, loss_name, sizes, quick)
    comparisons = [
        ("Anti-SGD", "SGD"),
        ("Anti-SGD", "SGD+independent"),
        ("SGD+independent", "SGD"),
    ]
    return _report(
        "mnist1d-minibatch", sizes.minibatch, results, comparisons, out, loss_name
    )


def correlation(quick: bool, shift: int, loss_name: str, out: pathlib.Path):
    """The sweep, in the minibatch regime at Anti-SGD's validated sigma."""
    sizes = settings(quick, loss_name)
    data = load(SPLIT_SEED + shift)
    setting = sizes.minibatch
    seeds = _seeds(setting.num_seeds, shift)
    cache_key = (tuple(seeds), loss_name, quick)
    if cache_key not in _ANTI_SGD_SIGMA:
        _minibatch_results(data, seeds, loss_name, sizes, quick)
    sigma = _ANTI_SGD_SIGMA[cache_key]
    correlations = np.asarray(sizes.correlations, np.float32)
    hursts = sizes.hursts
    sweeps = {
        "correlation": (
            Method("anti_pgd(correlation=c)", "anticorrelated", (sigma,)),
            {
                "noise_std": np.full(len(correlations), sigma, np.float32),
                "correlation": correlations,
            },
            tuple(f"c={c:g}" for c in sizes.correlations),
        ),
        "hurst": (
            Method("fractional_pgd(hurst=H)", "fractional", (sigma,)),
            {
                "noise_std": np.full(len(hursts), sigma, np.float32),
                "coefficients": np.stack(
                    [ap.fractional_coefficients(h, sizes.num_taps) for h in hursts]
                ).astype(np.float32),
            },
            tuple(f"H={h:g}" for h in hursts),
        ),
        "cyclic": (
            Method("anti_pgd(leaves='cyclic')", "cyclic", (sigma,)),
            {"noise_std": np.asarray([sigma], np.float32)},
            ("c=1, cyclic",),
        ),
    }
    rows = {}
    for name, (method, grid, points) in sweeps.items():
        result = train_grid(
            method,
            setting,
            data,
            seeds,
            loss_name,
            grid=grid,
            points=points,
            desc=f"mnist1d-correlation: {name}",
        )
        for index, point in enumerate(points):
            result.chosen = index  # every point is reported: no selection here
            rows[point] = diagnose(result, data, loss_name, sizes)
    return _report_sweep(setting, sigma, sizes, rows, out, loss_name)


EXPERIMENTS = {
    "mnist1d-large-batch": large_batch,
    "mnist1d-sharp-start": sharp_start,
    "mnist1d-minibatch": minibatch,
    "mnist1d-correlation": correlation,
}


# Reporting --------------------------------------------------------------------


def fmt(value: float) -> str:
    """A table cell: 3 significant digits, whole numbers from 100 to 1e5."""
    value = float(value)
    if value == 0 or 1e-2 <= abs(value) < 1e5:
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return f"{value:.2e}"  # also nan and inf


def _mean_std(values) -> str:
    values = np.asarray(values, np.float64)
    return f"{fmt(values.mean())} ± {fmt(values.std())}"


def summarize(metrics: dict) -> dict:
    """Metric -> values over seeds, to the mean, ``"<metric> std"`` and
    ``"<metric> per seed"`` that results.json keeps."""
    summary = {}
    for name, values in metrics.items():
        values = np.asarray(values, np.float64)
        summary[name] = float(values.mean())
        summary[f"{name} std"] = float(values.std())
        summary[f"{name} per seed"] = [float(v) for v in values]
    return summary


def paired(a: np.ndarray, b: np.ndarray, higher_is_better: bool) -> str:
    """Per-seed differences a - b: mean ± std, and the seeds favouring each side."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    better = diff > 0 if higher_is_better else diff < 0
    worse = diff < 0 if higher_is_better else diff > 0
    return (
        f"{fmt(diff.mean())} ± {fmt(diff.std())} "
        f"({int(better.sum())} / {int(worse.sum())} / "
        f"{int(len(diff) - better.sum() - worse.sum())})"
    )


def _report(
    experiment: str,
    setting: Setting,
    results: dict,
    comparisons,
    out: pathlib.Path,
    loss_name: str,
    start: dict | None = None,
) -> Outcome:
    header = ["method", "sigma (val)", *TABLE, "diverged"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    rows = dict(results)
    metrics = {name: m for name, (_, m) in rows.items()}
    if start is not None:
        metrics = {"start (GD converged)": start, **metrics}
    for name, values in metrics.items():
        grid = rows[name][0] if name in rows else None
        sigma = fmt(grid.method.sigmas[grid.chosen]) if grid else "-"
        diverged = int(np.sum(~np.isfinite(values["train loss"])))
        cells = [name, sigma, *(_mean_std(values[m]) for m in TABLE), str(diverged)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    grid_lines = [
        "| method | sigma | val accuracy % | test accuracy % | train loss | diverged |",
        "|---|---|---|---|---|---|",
    ]
    for name, (grid, _) in rows.items():
        for index, sigma in enumerate(grid.method.sigmas):
            mark = " (chosen)" if index == grid.chosen else ""
            final = {m: v[index] for m, v in grid.final.items()}
            grid_lines.append(
                f"| {name} | {fmt(sigma)}{mark} | "
                f"{_mean_std(final['val accuracy %'])} | "
                f"{_mean_std(final['test accuracy %'])} | "
                f"{_mean_std(final['train loss'])} | "
                f"{int(np.sum(~np.isfinite(final['train loss'])))} |"
            )
    grid_table = "\n".join(grid_lines)

    paired_lines = [
        "| comparison | test accuracy % (a - b) | Tr H (a - b) | lambda_max (a - b) |",
        "|---|---|---|---|",
    ]
    all_metrics = dict(metrics)
    if start is not None:
        all_metrics["start"] = start
    for a, b in comparisons:
        ma, mb = all_metrics[a], all_metrics[b]
        paired_lines.append(
            f"| {a} - {b} | "
            f"{paired(ma['test accuracy %'], mb['test accuracy %'], True)} | "
            f"{paired(ma['Tr H'], mb['Tr H'], False)} | "
            f"{paired(ma['lambda_max'], mb['lambda_max'], False)} |"
        )
    paired_table = "\n".join(paired_lines)

    steps = f"{setting.noisy_steps} noisy + {setting.clean_steps} clean steps"
    title = (
        f"## {experiment} (batch {setting.batch_size}, lr {setting.learning_rate}, "
        f"{steps}, {setting.num_seeds} seeds, loss {loss_name})"
    )
    markdown = "\n\n".join(
        [
            table,
            "Tr H by layer (the block traces of its weights and biases, with "
            "the probes of Tr H):",
            layer_table(metrics),
            "Every grid point (the chosen sigma has the best mean validation "
            "accuracy):",
            grid_table,
            "Paired by seed: mean ± std of the differences (seeds favouring a / "
            "b / tied; for Tr H and lambda_max, lower is favoured):",
            paired_table,
        ]
    )
    _plot(experiment, setting, results, out, loss_name)
    summary = {name: summarize(m) for name, m in metrics.items()}
    for name, (grid, _) in rows.items():
        summary[name]["sigma"] = float(grid.method.sigmas[grid.chosen])
        for index, sigma in enumerate(grid.method.sigmas):
            for metric in ("val accuracy %", "test accuracy %", "train loss"):
                values = grid.final[metric][index]
                summary[name][f"{metric} (sigma={sigma:g})"] = float(values.mean())
    return Outcome(title, markdown, summary)


def one_figure_at_a_time(plot: Callable) -> Callable:
    """``plot``, holding :data:`PLOT_LOCK`."""

    @functools.wraps(plot)
    def locked(*args, **kwargs):
        with PLOT_LOCK:
            return plot(*args, **kwargs)

    return locked


@one_figure_at_a_time
def _plot(
    experiment: str, setting: Setting, results: dict, out: pathlib.Path, loss_name: str
):
    """Validation accuracy over steps at the chosen sigma; test accuracy vs sigma."""
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    for name, (grid, _) in results.items():
        color = COLORS.get(name)
        curve = grid.curves["val accuracy %"][grid.chosen]
        steps = np.arange(curve.shape[-1]) * setting.chunk
        mean, std = np.nanmean(curve, 0), np.nanstd(curve, 0)
        sigma = grid.method.sigmas[grid.chosen]
        label = name if sigma == 0 else f"{name} (sigma={sigma:g})"
        axes[0].plot(steps, mean, color=color, label=label)
        axes[0].fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
        test = grid.final["test accuracy %"]
        if len(grid.method.sigmas) == 1 and grid.method.sigmas[0] == 0:
            axes[1].axhline(test.mean(), color=color, label=name)
            axes[1].axhspan(
                test.mean() - test.std(),
                test.mean() + test.std(),
                color=color,
                alpha=0.15,
            )
        else:
            axes[1].errorbar(
                grid.method.sigmas,
                test.mean(-1),
                test.std(-1),
                color=color,
                marker="o",
                capsize=3,
                label=name,
            )
    axes[0].axvline(setting.noisy_steps, color="gray", lw=0.8, ls="--")
    axes[0].set_xlabel("step (noise off after the dashed line)")
    axes[0].set_ylabel("validation accuracy % (mean ± std)")
    axes[0].set_ylim(bottom=max(axes[0].get_ylim()[0], 50))
    axes[0].legend(fontsize=8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("sigma")
    axes[1].set_ylabel("test accuracy % (mean ± std)")
    axes[1].set_ylim(bottom=max(axes[1].get_ylim()[0], 50))
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{experiment} ({LOSS_NAMES[loss_name]})")
    fig.tight_layout()
    fig.savefig(out / f"{experiment}.png", dpi=90)


def _report_sweep(
    setting: Setting,
    sigma: float,
    sizes: Settings,
    rows: dict,
    out: pathlib.Path,
    loss_name: str,
) -> Outcome:
    header = ["setting", "test accuracy %", "val accuracy %", "Tr H", "Tr H s.e."]
    header += ["lambda_max", "train loss", "logits RMS", "diverged"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point, values in rows.items():
        cells = [point] + [_mean_std(values[m]) for m in header[1:-1]]
        cells.append(str(int(np.sum(~np.isfinite(values["train loss"])))))
        lines.append("| " + " | ".join(cells) + " |")
    title = (
        f"## mnist1d-correlation (minibatch regime: batch {setting.batch_size}, "
        f"lr {setting.learning_rate}, {setting.noisy_steps} noisy + "
        f"{setting.clean_steps} clean steps, sigma {sigma:g} = Anti-SGD's validated, "
        f"{setting.num_seeds} seeds, loss {loss_name})"
    )
    _plot_sweep(sizes, rows, sigma, out, loss_name)
    summary = {point: summarize(values) for point, values in rows.items()}
    return Outcome(title, "\n".join(lines), summary)


@one_figure_at_a_time
def _plot_sweep(
    sizes: Settings, rows: dict, sigma: float, out: pathlib.Path, loss_name: str
):
    fig = Figure(figsize=(9, 6))
    axes = fig.subplots(2, 2, sharey="row")
    cyclic = rows["c=1, cyclic"]
    for column, (label, values, fmt_point) in enumerate(
        (
            ("anticorrelation c of xi_{n+1} - c xi_n", sizes.correlations, "c={:g}"),
            (
                f"Hurst exponent H ({sizes.num_taps}-tap fractional noise)",
                sizes.hursts,
                "H={:g}",
            ),
        )
    ):
        for row, metric in enumerate(("test accuracy %", "Tr H")):
            ax = axes[row, column]
            data = [np.asarray(rows[fmt_point.format(v)][metric]) for v in values]
            mean = [d.mean() for d in data]
            std = [d.std() for d in data]
            ax.errorbar(values, mean, std, marker="o", capsize=3, label="all leaves")
            if column == 0:
                c = np.asarray(cyclic[metric])
                ax.errorbar(
                    [1.0],
                    [c.mean()],
                    [c.std()],
                    marker="s",
                    color="tab:orange",
                    capsize=3,
                    label="c=1, cyclic leaves",
                    ls="none",
                )
                ax.legend(fontsize=8)
            ax.set_xlabel(label)
            if column == 0:
                ax.set_ylabel(metric + " (mean ± std)")
            if metric == "Tr H":
                ax.set_yscale("log")
    fig.suptitle(
        f"mnist1d-correlation: minibatch SGD + noise, sigma {sigma:g} "
        f"({LOSS_NAMES[loss_name]})"
    )
    fig.tight_layout()
    fig.savefig(out / "mnist1d-correlation.png", dpi=90)
