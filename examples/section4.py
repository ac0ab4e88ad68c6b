"""The paper's deep-learning claims: one protocol, for any classification task.

Orvieto et al. (ICML 2022, Section 4) make three claims about real networks,
each an experiment here, run by ``reproduce_paper.py`` on every task
(``mnist1d_experiments.py``: MNIST-1D and a 1-D CNN; ``mnist_experiments.py``:
MNIST digits and a 2-D CNN):

1. ``<task>-large-batch``: with large batches and momentum, Anti-PGD
   generalizes better than GD, and than PGD at any noise level, and ends in a
   flatter minimum.
2. ``<task>-sharp-start``: started from a minimum that GD converged to,
   Anti-PGD recovers flatness and accuracy; PGD does not.
3. ``<task>-minibatch``: anticorrelated noise on top of minibatch SGD
   ("Anti-SGD") improves on SGD, and on SGD with independent noise.

The large-batch and minibatch experiments have a row for SAM
(``optax.contrib.sam`` around the same clipped SGD with momentum; the ascent
step is normalized SGD of size ``rho``), the flat-minima method users already
have. It spends two gradient evaluations per step, the others one: the tables
compare at equal steps, and also at equal gradient evaluations (SAM's state
halfway through its run, which, with a constant learning rate and no noise,
is exactly a run of half the steps).

``<task>-correlation`` sweeps the noise between those laws in the minibatch
regime, at Anti-SGD's validated sigma: the anticorrelation ``c`` of
``xi_{n+1} - c xi_n`` (``ap.anti_pgd(correlation=c)``, all values in one
program), the Hurst exponent ``H`` of fractional noise (the filter of
``ap.fractional_pgd(hurst=H)``, given to ``ap.add_correlated_noise`` so that
every ``H`` runs in one program), and noise on one layer at a time
(``leaves="cyclic"``) against all layers at once.

Protocol, fixed before any test accuracy was computed:

- Splits: a validation split is held out of the training examples; steps see
  only the rest. Test examples decide nothing.
- Common settings, chosen for GD (SGD) alone on validation accuracy:
  momentum 0.9, gradients clipped to global norm 1, and the learning rate
  from a grid of doublings (the task's module says which, and why).
- Per method, one choice: its noise level sigma (SAM: ``rho``) from a grid of
  three, the one with the best validation accuracy averaged over the seeds
  (ties: the smaller). Every grid point is trained (all points and seeds of
  a method run at once, ``jax.vmap`` inside one ``jax.jit``); tables report
  test accuracy at the chosen point and, for the record, at every point.
- Noise in parameter space (``ap.pgd``, ``ap.anti_pgd``), constant for the
  noisy phase, then exactly 0 for the last quarter of the steps (a clean
  phase): Anti-PGD returns to its noise-free iterate, and every method ends
  on plain (S)GD steps.
- Seeds: 5; seed ``i`` fixes the initialization, the batch order and the
  noise, the same for every method (paired runs). Tables give mean ± std over
  seeds; each claim gets the per-seed differences (mean ± std) and the number
  of seeds favouring each side.
- At the end of each run: test accuracy, training loss (all training
  examples), ``Tr H`` of the training loss on a fixed subset of the training
  examples (Hutchinson, Rademacher probes, with the standard error of the
  estimate), the trace of each layer's diagonal block (the same probes: the
  layers sum to ``Tr H``), ``lambda_max`` of the same Hessian (Lanczos) and
  the RMS of the logits: with cross-entropy, noise can lower ``Tr H`` by
  scaling the logits up rather than by finding a flatter region.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import pathlib
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

NUM_CLASSES = 10
MOMENTUM = 0.9
CLIP_NORM = 1.0
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
    "SAM": "tab:orange",
}

# Data -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Data:
    """A task's three splits; steps only ever see ``x_train``."""

    x_train: np.ndarray  # float32, [examples, ...]
    y_train: np.ndarray  # int32, [examples]
    x_val: np.ndarray  # held out from the training examples
    y_val: np.ndarray
    x_test: np.ndarray
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


# Models -----------------------------------------------------------------------


class Conv(nnx.Module):
    """A convolution of any dimension, channels last, as strided slices and a matmul.

    The same parameters and numbers as ``nnx.Conv`` with symmetric padding
    (kernel ``[*kernel_size, in, out]``, LeCun-normal, zero bias), but fast
    under ``jax.vmap`` over runs on a CPU, where a batched kernel turns the
    XLA convolution into a slow grouped one.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: tuple[int, ...],
        *,
        stride: int,
        padding: int,
        rngs: nnx.Rngs,
    ):
        shape = (*kernel_size, in_features, out_features)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros(out_features))
        self.stride, self.padding = stride, padding

    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, *spatial, in]
        *kernel_size, _, out_features = self.kernel.shape
        pad = (self.padding, self.padding)
        x = jnp.pad(x, ((0, 0), *[pad] * len(kernel_size), (0, 0)))
        lengths = [
            (n - k) // self.stride + 1
            for n, k in zip(x.shape[1:-1], kernel_size, strict=True)
        ]
        ends = [self.stride * (n - 1) + 1 for n in lengths]
        # One slice per kernel offset, in the kernel's (row-major) order.
        patches = jnp.concatenate(
            [
                x[
                    (
                        slice(None),
                        *(
                            slice(j, j + end, self.stride)
                            for j, end in zip(offset, ends, strict=True)
                        ),
                    )
                ]
                for offset in itertools.product(*map(range, kernel_size))
            ],
            axis=-1,
        )
        kernel = self.kernel[...].reshape(-1, out_features)
        bias = self.bias[...].reshape((1,) * (patches.ndim - 1) + (-1,))
        return patches @ kernel + bias


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A dataset and a network: what the protocol is run on.

    Compiled programs are cached per task (by identity).
    """

    name: str  # the experiments' prefix, "mnist1d" -> "mnist1d-large-batch"
    title: str  # in words, for figures: "MNIST-1D"
    load: Callable[[int], Data]  # split seed -> the splits (cached)
    model: Callable[[nnx.Rngs], nnx.Module]  # the network, logits of a batch
    settings: Callable[[bool, str], Settings]  # (quick, loss name) -> sizes

    @functools.cached_property
    def _graphdef(self):
        # Abstract: building a real model here would compile its initializers.
        return nnx.split(nnx.eval_shape(lambda: self.model(nnx.Rngs(0))), nnx.Param)[0]

    def init_params(self, key: jax.Array) -> Any:
        return nnx.split(self.model(nnx.Rngs(key)), nnx.Param)[1]

    def logits_fn(self, params: Any, x: jax.Array) -> jax.Array:
        return nnx.merge(self._graphdef, params)(x)

    @functools.cached_property
    def init_params_program(self) -> Callable[[jax.Array], Any]:
        """Keys ``[seed]`` -> params ``[seed, ...]``."""
        return jax.jit(jax.vmap(self.init_params))


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
    """A named optimizer family and its grid, chosen on validation.

    The grid is of the noise's sigma (``(0.0,)``: noise-free), or of SAM's
    ``rho``.
    """

    name: str
    family: str  # a key of FAMILIES
    values: tuple[float, ...]

    @property
    def grid_name(self) -> str:
        return "rho" if self.family == "sam" else "sigma"

    @property
    def hyper_name(self) -> str:
        """The hyperparameter its grid sets: ``rho`` or ``noise_std``."""
        return "rho" if self.family == "sam" else "noise_std"

    @property
    def gradients_per_step(self) -> int:
        return 2 if self.family == "sam" else 1


@dataclasses.dataclass(frozen=True)
class Settings:
    large_batch: Setting
    sharp_start: Setting  # continues from large_batch's GD
    minibatch: Setting
    sigmas: tuple[float, ...]  # the grid of every noisy method
    rhos: tuple[float, ...]  # SAM's grid
    correlations: tuple[float, ...]
    hursts: tuple[float, ...]
    trace_probes: int
    lanczos_steps: int
    hessian_examples: int  # the training signals the Hessian is taken on
    num_taps: int  # of the fractional noise's filter


# A smoke run's sizes, for every task: one batch size everywhere, so the three
# regimes share their compiled programs; one point per grid (the correlation
# sweep reuses Anti-SGD's program), two seeds, a few steps. Numbers meaningless.
_TINY = Setting(64, 0.05, noisy_steps=6, clean_steps=2, chunk=4, num_seeds=2)
QUICK = Settings(
    large_batch=_TINY,
    sharp_start=_TINY,
    minibatch=_TINY,
    sigmas=(0.01,),
    rhos=(0.05,),
    correlations=(0.5,),
    hursts=(0.25,),
    trace_probes=4,
    lanczos_steps=4,
    hessian_examples=64,
    num_taps=2,
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


def _sam(hyper, key):
    # The same clipped SGD steps from the gradient at the ascent point.
    ascent = optax.chain(optax.contrib.normalize(), optax.sgd(hyper["rho"]))
    return optax.contrib.sam(
        make_optimizer("noise-free", hyper, key), ascent, opaque_mode=True
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
    "sam": _sam,
}


def make_optimizer(family: str, hyper: dict, key: jax.Array):
    """Clipping, then the family's optimizer (noise after the step: paper's law).

    SAM's update takes ``grad_fn`` (the gradient at any params, on the step's
    batch): it clips the gradient it steps with, inside.
    """
    if family == "sam":
        return _sam(hyper, key)
    return optax.chain(
        optax.clip_by_global_norm(CLIP_NORM), FAMILIES[family](hyper, key)
    )


# Compiled programs: one per (task, family, loss), shared by the experiments ---
#
# Runs are laid out [grid, seed]: the grid axis carries the per-point
# hyperparameters (sigma, rho, correlation, filter), the seed axis the init, the
# noise key and the batch order. The learning rate and the length of the
# noisy phase are traced, so the large-batch and sharp-start experiments
# share their programs.

_GRID_AXES = {
    "learning_rate": None,
    "noisy_steps": None,
    "noise_std": 0,
    "rho": 0,
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
def _advance_program(task: Task, family: str, loss_name: str) -> Callable:
    loss = LOSSES[loss_name]

    def advance_one(params, state, hyper, key, batches, x, y):
        opt = make_optimizer(family, hyper, key)

        def step(carry, batch):
            params, state = carry
            grad_fn = jax.grad(lambda p: loss(task.logits_fn(p, x[batch]), y[batch]))
            # grad_fn is used by SAM (its ascent point) only; the others ignore it.
            updates, state = opt.update(
                grad_fn(params), state, params, grad_fn=lambda p, _: grad_fn(p)
            )
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), batches)[0]

    def advance(carry, hyper, keys, batches, x, y):
        per_seed = jax.vmap(advance_one, in_axes=(0, 0, None, 0, 0, None, None))
        per_grid = jax.vmap(
            per_seed, in_axes=(0, 0, _grid_axes(hyper), None, None, None, None)
        )
        return per_grid(*carry, hyper, keys, batches, x, y)

    return jax.jit(advance, donate_argnums=0)


def _evaluate_one(params, data, *, task, loss):
    """Accuracies, training loss and logit scale of one run."""
    x_train, y_train, x_val, y_val, x_test, y_test = data
    train_logits = task.logits_fn(params, x_train)

    def accuracy(x, y):
        return 100 * jnp.mean(jnp.argmax(task.logits_fn(params, x), -1) == y)

    return {
        "val accuracy %": accuracy(x_val, y_val),
        "test accuracy %": accuracy(x_test, y_test),
        "train loss": loss(train_logits, y_train),
        "logits RMS": jnp.sqrt(jnp.mean(train_logits**2)),
    }


@functools.cache
def _evaluate_program(task: Task, loss_name: str) -> Callable:
    loss = LOSSES[loss_name]
    one = functools.partial(_evaluate_one, task=task, loss=loss)
    return jax.jit(jax.vmap(jax.vmap(one, in_axes=(0, None)), in_axes=(0, None)))


@functools.cache
def _diagnostics_program(
    task: Task, loss_name: str, trace_probes: int, lanczos_steps: int
) -> Callable:
    """``Tr H`` with its standard error, the layers' traces and ``lambda_max``."""
    loss = LOSSES[loss_name]
    probe_keys = jax.random.split(jax.random.key(0), trace_probes)

    def one(params, x, y):
        def objective(p):
            return loss(task.logits_fn(p, x), y)

        # One probe per key, split by leaf: the probes' leaves sum to their
        # Hutchinson forms z.Hz, whose mean is Tr H and spread its error.
        forms = jax.lax.map(
            lambda key: ap.hessian_block_traces(objective, params, key, num_samples=1),
            probe_keys,
            batch_size=8,
        )
        totals = sum(jax.tree.leaves(forms))
        top = ap.hessian_eigenvalues(
            objective, params, 1, k=1, num_matvecs=lanczos_steps
        )
        return {
            "Tr H": jnp.mean(totals),
            "Tr H s.e.": jnp.std(totals, ddof=1) / jnp.sqrt(trace_probes),
            "lambda_max": top[0],
            **layer_traces(jax.tree.map(jnp.mean, forms)),
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
    task: Task,
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
    seed). ``grid``: per-point hyperparameters (default: ``noise_std``, or
    SAM's ``rho``, over ``method.values``).
    """
    if grid is None:
        grid = {method.hyper_name: np.asarray(method.values, np.float32)}
        points = tuple(f"{method.grid_name}={v:g}" for v in method.values)
    if method.family == "anticorrelated" and "correlation" not in grid:
        # Traced like the sweep's, so the sweep may reuse the program.
        grid = {**grid, "correlation": np.ones(len(method.values), np.float32)}
    num_points = len(next(iter(grid.values())))
    keys = jnp.stack([jax.random.key(seed) for seed in seeds])
    init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    if start is None:
        start = task.init_params_program(init_keys)
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
    advance = _advance_program(task, method.family, loss_name)
    evaluate = _evaluate_program(task, loss_name)
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
    # Selection looks at the final validation accuracy only; the test curve
    # is kept for SAM's figures at equal gradient evaluations.
    curves = {
        name: np.stack([np.asarray(log[name]) for log in logs], axis=-1)
        for name in final
    }
    result = GridResult(method, points, curves, final, carry[0])
    result.chosen = choose(final["val accuracy %"])
    return result


def choose(val_accuracy: np.ndarray) -> int:
    """The grid point with the best mean validation accuracy; ties: the first."""
    mean = np.nan_to_num(np.asarray(val_accuracy, np.float64), nan=-1.0).mean(-1)
    return int(np.flatnonzero(mean == mean.max())[0])


def diagnose(
    task: Task, result: GridResult, data: Data, loss_name: str, sizes: Settings
) -> dict:
    """Final metrics of the chosen grid point, per seed, with the Hessian's."""
    chosen = jax.tree.map(lambda leaf: leaf[result.chosen], result.params)
    metrics = {name: value[result.chosen] for name, value in result.final.items()}
    metrics.update(hessian_metrics(task, chosen, data, loss_name, sizes))
    return metrics


def hessian_metrics(
    task: Task, params: Any, data: Data, loss_name: str, sizes: Settings
) -> dict:
    """``Tr H``, its standard error, the layers' and ``lambda_max`` per seed."""
    program = _diagnostics_program(
        task, loss_name, sizes.trace_probes, sizes.lanczos_steps
    )
    examples = slice(0, sizes.hessian_examples)
    x, y = jnp.asarray(data.x_train[examples]), jnp.asarray(data.y_train[examples])
    return {
        name: np.asarray(value)
        for name, value in jax.device_get(program(params, x, y)).items()
    }


def equal_gradients(result: GridResult, setting: Setting) -> dict | None:
    """A two-gradient method's final metrics at half its steps (per seed).

    With a constant learning rate and no noise, a run's state halfway is
    exactly the end of a run of half the steps: the metrics at the others'
    number of gradient evaluations. ``None`` for one-gradient methods.
    """
    if result.method.gradients_per_step == 1:
        return None
    steps = setting.steps // result.method.gradients_per_step
    if steps % setting.chunk:
        raise ValueError(
            f"{steps} steps are not a logged point (every {setting.chunk})."
        )
    point = steps // setting.chunk
    return {
        name: curve[result.chosen, :, point] for name, curve in result.curves.items()
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


@dataclasses.dataclass(frozen=True)
class Run:
    """One experiment's call: the task, and the command line's choices."""

    task: Task
    quick: bool
    shift: int  # added to every seed and to the split's seed
    loss_name: str
    out: pathlib.Path

    @functools.cached_property
    def sizes(self) -> Settings:
        return self.task.settings(self.quick, self.loss_name)

    @functools.cached_property
    def data(self) -> Data:
        return self.task.load(self.shift)

    def seeds(self, setting: Setting) -> list[int]:
        return [2022 + self.shift + i for i in range(setting.num_seeds)]

    def cache_key(self, setting: Setting) -> tuple:
        return (self.task, tuple(self.seeds(setting)), self.loss_name, self.quick)

    def train(self, method: Method, setting: Setting, **kwargs) -> GridResult:
        return train_grid(
            self.task,
            method,
            setting,
            self.data,
            self.seeds(setting),
            self.loss_name,
            **kwargs,
        )

    def diagnose(self, result: GridResult) -> dict:
        return diagnose(self.task, result, self.data, self.loss_name, self.sizes)

    def methods(self, names: tuple[str, str, str], sam: bool) -> tuple[Method, ...]:
        """The noise-free method, independent and anticorrelated noise; SAM."""
        methods = (
            Method(names[0], "noise-free", (0.0,)),
            Method(names[1], "independent", self.sizes.sigmas),
            Method(names[2], "anticorrelated", self.sizes.sigmas),
        )
        return (*methods, Method("SAM", "sam", self.sizes.rhos)) if sam else methods

    def run_methods(
        self, experiment: str, methods, setting: Setting, start=None
    ) -> dict[str, tuple[GridResult, dict]]:
        results = {}
        for method in methods:
            desc = f"{experiment}: {method.name}"
            grid = self.train(method, setting, start=start, desc=desc)
            results[method.name] = (grid, self.diagnose(grid))
        return results

    def report(self, experiment, setting, results, comparisons, **kwargs) -> Outcome:
        return _report(
            experiment,
            self.task,
            setting,
            results,
            comparisons,
            self.out,
            self.loss_name,
            **kwargs,
        )


# GD's final params and their metrics per Run.cache_key: the sharp start's
# starting point, measured once.
_GD_ENDS: dict[tuple, tuple[Any, dict]] = {}


def _gd_end(result: GridResult, metrics: dict) -> tuple[Any, dict]:
    """GD's params ``[seed, ...]`` (its one grid point) and their metrics."""
    return jax.tree.map(lambda leaf: leaf[0], result.params), metrics


def _large_batch_results(run: Run) -> dict:
    setting = run.sizes.large_batch
    methods = run.methods(("GD", "PGD", "Anti-PGD"), sam=True)
    results = run.run_methods(f"{run.task.name}-large-batch", methods, setting)
    _GD_ENDS[run.cache_key(setting)] = _gd_end(*results["GD"])
    return results


def large_batch(run: Run) -> Outcome:
    results = _large_batch_results(run)
    comparisons = [
        ("Anti-PGD", "GD"),
        ("Anti-PGD", "PGD"),
        ("PGD", "GD"),
        ("Anti-PGD", "SAM"),
        ("SAM", "GD"),
    ]
    return run.report(
        f"{run.task.name}-large-batch", run.sizes.large_batch, results, comparisons
    )


def sharp_start(run: Run) -> Outcome:
    sizes = run.sizes
    cache_key = run.cache_key(sizes.large_batch)
    if cache_key not in _GD_ENDS:
        gd = Method("GD", "noise-free", (0.0,))
        result = run.train(gd, sizes.large_batch, desc="sharp start: GD")
        _GD_ENDS[cache_key] = _gd_end(result, run.diagnose(result))
    start, start_metrics = _GD_ENDS[cache_key]
    experiment = f"{run.task.name}-sharp-start"
    methods = run.methods(("GD", "PGD", "Anti-PGD"), sam=False)
    results = run.run_methods(experiment, methods, sizes.sharp_start, start=start)
    comparisons = [("Anti-PGD", "GD"), ("Anti-PGD", "PGD"), ("Anti-PGD", "start")]
    return run.report(
        experiment, sizes.sharp_start, results, comparisons, start=start_metrics
    )


# Anti-SGD's validated sigma per Run.cache_key: the sweep's noise level.
_ANTI_SGD_SIGMA: dict[tuple, float] = {}


def _minibatch_results(run: Run, sam: bool = True) -> dict:
    setting = run.sizes.minibatch
    methods = run.methods(("SGD", "SGD+independent", "Anti-SGD"), sam=sam)
    results = run.run_methods(f"{run.task.name}-minibatch", methods, setting)
    anti = results["Anti-SGD"][0]
    _ANTI_SGD_SIGMA[run.cache_key(setting)] = anti.method.values[anti.chosen]
    return results


def minibatch(run: Run) -> Outcome:
    results = _minibatch_results(run)
    comparisons = [
        ("Anti-SGD", "SGD"),
        ("Anti-SGD", "SGD+independent"),
        ("SGD+independent", "SGD"),
        ("Anti-SGD", "SAM"),
        ("SAM", "SGD"),
    ]
    return run.report(
        f"{run.task.name}-minibatch", run.sizes.minibatch, results, comparisons
    )


def correlation(run: Run) -> Outcome:
    """The sweep, in the minibatch regime at Anti-SGD's validated sigma."""
    sizes = run.sizes
    setting = sizes.minibatch
    cache_key = run.cache_key(setting)
    if cache_key not in _ANTI_SGD_SIGMA:
        _minibatch_results(run, sam=False)
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
    experiment = f"{run.task.name}-correlation"
    for name, (method, grid, points) in sweeps.items():
        result = run.train(
            method, setting, grid=grid, points=points, desc=f"{experiment}: {name}"
        )
        for index, point in enumerate(points):
            result.chosen = index  # every point is reported: no selection here
            rows[point] = run.diagnose(result)
    return _report_sweep(
        experiment, run.task, setting, sigma, sizes, rows, run.out, run.loss_name
    )


def experiments(task: Task) -> dict[str, Callable[[Run], Outcome]]:
    """The task's experiments by name, ``"<task>-large-batch"`` and so on."""
    return {
        f"{task.name}-large-batch": large_batch,
        f"{task.name}-sharp-start": sharp_start,
        f"{task.name}-minibatch": minibatch,
        f"{task.name}-correlation": correlation,
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


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _diverged(values) -> str:
    return str(int(np.sum(~np.isfinite(values))))


def _paired_cell(ma: dict, mb: dict, metric: str, higher_is_better: bool) -> str:
    if metric not in ma or metric not in mb:
        return "-"
    return paired(ma[metric], mb[metric], higher_is_better)


def _report(
    experiment: str,
    task: Task,
    setting: Setting,
    results: dict,
    comparisons,
    out: pathlib.Path,
    loss_name: str,
    start: dict | None = None,
) -> Outcome:
    metrics = {name: m for name, (_, m) in results.items()}
    if start is not None:
        metrics = {"start (GD converged)": start, **metrics}
    rows = []
    for name, values in metrics.items():
        grid = results[name][0] if name in results else None
        chosen = "-"
        if grid is not None and grid.method.family != "noise-free":
            value = grid.method.values[grid.chosen]
            chosen = f"{grid.method.grid_name} {fmt(value)}"
        cells = [_mean_std(values[m]) for m in TABLE]
        rows.append([name, chosen, *cells, _diverged(values["train loss"])])
    table = _table(["method", "chosen (val)", *TABLE, "diverged"], rows)

    grid_rows = []
    for name, (grid, _) in results.items():
        for index, value in enumerate(grid.method.values):
            mark = " (chosen)" if index == grid.chosen else ""
            final = {m: v[index] for m, v in grid.final.items()}
            grid_rows.append(
                [
                    name,
                    f"{grid.method.grid_name}={fmt(value)}{mark}",
                    _mean_std(final["val accuracy %"]),
                    _mean_std(final["test accuracy %"]),
                    _mean_std(final["train loss"]),
                    _diverged(final["train loss"]),
                ]
            )
    grid_header = ["method", "grid point", "val accuracy %", "test accuracy %"]
    grid_table = _table([*grid_header, "train loss", "diverged"], grid_rows)

    # Equal gradient evaluations: two-gradient methods at half their steps.
    halves = {
        f"{name} (equal gradients)": half
        for name, (grid, _) in results.items()
        if (half := equal_gradients(grid, setting)) is not None
    }
    all_metrics = {**metrics, **halves}
    if start is not None:
        all_metrics["start"] = start
    budget_rows = []
    for name, (grid, _) in results.items():
        per_step = grid.method.gradients_per_step
        runs = [(name, setting.steps, metrics[name])]
        if per_step > 1:
            half = f"{name} (equal gradients)"
            runs.append((half, setting.steps // per_step, halves[half]))
        for label, steps, values in runs:
            budget_rows.append(
                [
                    label,
                    str(steps),
                    str(steps * per_step),
                    _mean_std(values["test accuracy %"]),
                    _mean_std(values["val accuracy %"]),
                    _mean_std(values["train loss"]),
                ]
            )
    budget_header = ["method", "steps", "gradient evaluations", "test accuracy %"]
    budget_table = _table([*budget_header, "val accuracy %", "train loss"], budget_rows)

    paired_rows = []
    for a, b in comparisons:
        ma, mb = all_metrics[a], all_metrics[b]
        paired_rows.append(
            [
                f"{a} - {b}",
                _paired_cell(ma, mb, "test accuracy %", True),
                _paired_cell(ma, mb, "Tr H", False),
                _paired_cell(ma, mb, "lambda_max", False),
            ]
        )
    paired_header = ["comparison", "test accuracy % (a - b)", "Tr H (a - b)"]
    paired_table = _table([*paired_header, "lambda_max (a - b)"], paired_rows)

    steps = f"{setting.noisy_steps} noisy + {setting.clean_steps} clean steps"
    title = (
        f"## {experiment} (batch {setting.batch_size}, lr {setting.learning_rate}, "
        f"{steps}, {setting.num_seeds} seeds, loss {loss_name})"
    )
    parts = [
        table,
        "Tr H by layer (the block traces of its weights and biases, with "
        "the probes of Tr H):",
        layer_table(metrics),
        "Every grid point (the chosen one has the best mean validation accuracy):",
        grid_table,
    ]
    if halves:
        parts += [
            "Gradient evaluations: SAM takes two per step. With a constant "
            "learning rate and no noise, its state at half its steps is a run "
            "of half the steps, at the others' number of gradients:",
            budget_table,
        ]
    parts += [
        "Paired by seed: mean ± std of the differences (seeds favouring a / "
        "b / tied; for Tr H and lambda_max, lower is favoured):",
        paired_table,
    ]
    _plot(experiment, task, setting, results, out, loss_name)
    summary = {name: summarize(m) for name, m in metrics.items()}
    for name, half in halves.items():
        summary[name] = summarize(half)
    for name, (grid, _) in results.items():
        grid_name = grid.method.grid_name
        summary[name][grid_name] = float(grid.method.values[grid.chosen])
        summary[name]["gradient evaluations"] = (
            setting.steps * grid.method.gradients_per_step
        )
        for index, value in enumerate(grid.method.values):
            for metric in ("val accuracy %", "test accuracy %", "train loss"):
                values = grid.final[metric][index]
                key = f"{metric} ({grid_name}={value:g})"
                summary[name][key] = float(values.mean())
    return Outcome(title, "\n\n".join(parts), summary)


def one_figure_at_a_time(plot: Callable) -> Callable:
    """``plot``, holding :data:`PLOT_LOCK`."""

    @functools.wraps(plot)
    def locked(*args, **kwargs):
        with PLOT_LOCK:
            return plot(*args, **kwargs)

    return locked


@one_figure_at_a_time
def _plot(
    experiment: str,
    task: Task,
    setting: Setting,
    results: dict,
    out: pathlib.Path,
    loss_name: str,
):
    """Validation accuracy over steps at the chosen point; test accuracy vs sigma."""
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2)
    for name, (grid, _) in results.items():
        color = COLORS.get(name)
        curve = grid.curves["val accuracy %"][grid.chosen]
        steps = np.arange(curve.shape[-1]) * setting.chunk
        mean, std = np.nanmean(curve, 0), np.nanstd(curve, 0)
        value = grid.method.values[grid.chosen]
        grid_name = grid.method.grid_name
        label = name if value == 0 else f"{name} ({grid_name}={value:g})"
        axes[0].plot(steps, mean, color=color, label=label)
        axes[0].fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
        test = grid.final["test accuracy %"]
        if grid.method.family == "noise-free":
            axes[1].axhline(test.mean(), color=color, label=name)
            axes[1].axhspan(
                test.mean() - test.std(),
                test.mean() + test.std(),
                color=color,
                alpha=0.15,
            )
        else:
            axes[1].errorbar(
                grid.method.values,
                test.mean(-1),
                test.std(-1),
                color=color,
                marker="o",
                capsize=3,
                ls="--" if grid_name == "rho" else "-",
                label=name if grid_name == "sigma" else f"{name} (x: rho)",
            )
    axes[0].axvline(setting.noisy_steps, color="gray", lw=0.8, ls="--")
    axes[0].set_xlabel("step (noise off after the dashed line)")
    axes[0].set_ylabel("validation accuracy % (mean ± std)")
    axes[0].set_ylim(bottom=max(axes[0].get_ylim()[0], 50))
    axes[0].legend(fontsize=8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("sigma (SAM: rho)")
    axes[1].set_ylabel("test accuracy % (mean ± std)")
    axes[1].set_ylim(bottom=max(axes[1].get_ylim()[0], 50))
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{experiment}: {task.title} ({LOSS_NAMES[loss_name]})")
    fig.tight_layout()
    fig.savefig(out / f"{experiment}.png", dpi=90)


def _report_sweep(
    experiment: str,
    task: Task,
    setting: Setting,
    sigma: float,
    sizes: Settings,
    rows: dict,
    out: pathlib.Path,
    loss_name: str,
) -> Outcome:
    header = ["setting", "test accuracy %", "val accuracy %", "Tr H", "Tr H s.e."]
    header += ["lambda_max", "train loss", "logits RMS", "diverged"]
    cells = [
        [point, *(_mean_std(values[m]) for m in header[1:-1])]
        + [_diverged(values["train loss"])]
        for point, values in rows.items()
    ]
    title = (
        f"## {experiment} (minibatch regime: batch {setting.batch_size}, "
        f"lr {setting.learning_rate}, {setting.noisy_steps} noisy + "
        f"{setting.clean_steps} clean steps, sigma {sigma:g} = Anti-SGD's validated, "
        f"{setting.num_seeds} seeds, loss {loss_name})"
    )
    _plot_sweep(experiment, task, sizes, rows, sigma, out, loss_name)
    summary = {point: summarize(values) for point, values in rows.items()}
    return Outcome(title, _table(header, cells), summary)


@one_figure_at_a_time
def _plot_sweep(
    experiment: str,
    task: Task,
    sizes: Settings,
    rows: dict,
    sigma: float,
    out: pathlib.Path,
    loss_name: str,
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
        f"{experiment}: {task.title}, minibatch SGD + noise, sigma {sigma:g} "
        f"({LOSS_NAMES[loss_name]})"
    )
    fig.tight_layout()
    fig.savefig(out / f"{experiment}.png", dpi=90)
