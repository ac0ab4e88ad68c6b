"""The noise transforms, their states, and the noise-free iterate.

Every transform emits a linear filter of one i.i.d. stream per leaf,
``xi_m = sigma(m) z_m`` (``_draws``, ``_keys``): the independent noise of PGD
adds ``xi_n`` at update ``n``; the correlated family adds
``sum_j c_j xi_{n+1-j}`` with the filter's coefficients ``c`` (``_filters``),
keeping the ``K - 1`` past draws in a ring or regenerating them from the key.
"""

import functools
import math
import operator
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_antipgd import _draws
from optax_antipgd import _filters
from optax_antipgd import _keys
from optax_antipgd import _trees

Distribution = Literal["gaussian", "rademacher"]
Leaves = Literal["all", "cyclic"]


class IndependentNoiseState(NamedTuple):
    """State of :func:`add_independent_noise`."""

    count: jax.Array  # int32 [], the number of updates so far.
    key: jax.Array  # uint32 [key size], raw data of the base key.


class CorrelatedNoiseState(NamedTuple):
    """State of the correlated noise transforms.

    The state of :func:`add_correlated_noise`, :func:`add_anticorrelated_noise`
    and :func:`add_fractional_noise` (``AnticorrelatedNoiseState`` is this
    class). At update count ``n`` a filter of ``K`` coefficients needs the
    ``K - 1`` past draws ``xi_n, ..., xi_{n+2-K}``: slot ``m mod (K - 1)`` of
    the ring holds ``xi_m``. Every field is a plain array, fixed in
    structure, shape and dtype by ``init``; this is the checkpoint format
    (codes in ``sampler``: key impl threefry2x32 0, rbg 1, unsafe_rbg 2, other
    -1; distribution gaussian 0, rademacher 1; leaves all 0, cyclic 1).
    """

    count: jax.Array  # int32 [], n: the number of updates so far.
    key: jax.Array  # uint32 [key size], raw data of the base key.
    coefficients: jax.Array  # float32 [K], the filter of the latest update.
    noise_std: jax.Array  # float32 [K - 1], sigma of the draw in each slot.
    # K - 1 trees like the params (float leaves in the dtype init saw, None at
    # the others), or () with store_noise=False.
    noise: tuple[optax.Updates, ...]
    sampler: jax.Array  # int32 [3], codes of key impl, distribution, leaves.
    digest: jax.Array  # uint32 [2], of the paths, shapes and dtypes init saw.


AnticorrelatedNoiseState = CorrelatedNoiseState


def _noise_std_fn(noise_std: optax.ScalarOrSchedule) -> Callable[[Any], jax.Array]:
    """Validates ``noise_std`` and returns ``count -> float32 sigma(count)``."""
    if callable(noise_std):
        return lambda count: jnp.asarray(noise_std(count), jnp.float32)
    is_number = isinstance(noise_std, (int, float, np.ndarray, np.generic, jax.Array))
    if not is_number or not jnp.issubdtype(jnp.result_type(noise_std), jnp.number):
        raise TypeError(f"noise_std must be a number or a schedule, got {noise_std!r}.")
    if jnp.ndim(noise_std) != 0:
        raise ValueError(
            "noise_std must be a scalar or a schedule, "
            f"got shape {jnp.shape(noise_std)}."
        )
    if not isinstance(noise_std, jax.core.Tracer):
        value = float(np.asarray(noise_std))
        if math.isnan(value) or value < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}.")
    return lambda count: jnp.asarray(noise_std, jnp.float32)


def _check_choice(name: str, value: Any, choices: dict[str, int]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def _perturbed(update, coefficients, *noises):
    """``update + sum_j c_j noise_j``, in the wider of their dtypes.

    Computed in the update's dtype when the noise has it (so Anti-PGD's
    ``update + (xi_{n+1} - xi_n)`` rounds as it always has), and returned in
    the update's dtype.
    """
    dtype = jnp.promote_types(jnp.result_type(update), jnp.result_type(noises[0]))
    terms = [
        c.astype(dtype) * noise.astype(dtype)
        for c, noise in zip(coefficients, noises, strict=True)
    ]
    perturbation = functools.reduce(operator.add, terms)
    return (update.astype(dtype) + perturbation).astype(jnp.result_type(update))


def add_independent_noise(
    noise_std: optax.ScalarOrSchedule,
    key: _keys.Key,
    *,
    leaves: Leaves = "all",
    distribution: Distribution = "gaussian",
) -> optax.GradientTransformation:
    r"""Adds i.i.d. noise to the updates: the perturbation of PGD.

    .. math::

        u_n \leftarrow u_n + \xi_n, \qquad \xi_n = \sigma(n) z_n,

    where :math:`z_n` is standard normal (or Rademacher, :math:`\pm 1`), drawn
    afresh at every step, and :math:`n` is the pre-increment update count. The
    noise of a leaf is a pure function of ``key``, :math:`n` and the leaf's
    path. Noise is drawn in float32 (float64 for float64 leaves), scaled, then
    cast to the update's dtype; int and bool leaves pass through untouched.
    When :math:`\sigma(n) = 0` nothing is drawn.

    Args:
      noise_std: The standard deviation :math:`\sigma` of the noise, a float
        :math:`\geq 0` or a schedule of the update count.
      key: An int seed, a raw ``uint32`` key (``jax.random.PRNGKey``), a typed
        key (``jax.random.key``, any impl) or a scalar integer array; it may
        be a tracer.
      leaves: ``"all"`` (every float leaf, every step) or ``"cyclic"`` (at
        update :math:`n` only float leaf :math:`n \bmod L` draws, the others
        get none: layer-wise noise).
      distribution: ``"gaussian"`` or ``"rademacher"`` (:math:`\pm\sigma`,
        the same covariance from one random bit per element).

    Returns:
      A :class:`optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_antipgd as ap
      >>> opt = optax.chain(optax.sgd(0.1), ap.add_independent_noise(0.01, key=0))
      >>> params = jnp.zeros(3)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.ones(3), state)
      >>> updates.shape, state[1].count
      ((3,), Array(1, dtype=int32))

    References:
      Orvieto et al, `Anticorrelated Noise Injection for Improved
      Generalization <https://arxiv.org/abs/2202.02831>`_, 2022

      Orvieto et al, `Explicit Regularization in Overparametrized Models via
      Noise Injection <https://arxiv.org/abs/2206.04613>`_, 2023
    """
    std_at = _noise_std_fn(noise_std)
    cyclic = _check_choice("leaves", leaves, _keys.LEAVES_CODES) == "cyclic"
    distribution = _check_choice("distribution", distribution, _keys.DISTRIBUTION_CODES)
    impl = _keys.key_impl(key)
    unit = (jnp.ones([], jnp.float32),)

    def init_fn(params):
        _trees.check_leaves(params)
        return IndependentNoiseState(
            count=jnp.zeros([], jnp.int32), key=_keys.key_data(key)
        )

    def update_fn(updates, state, params=None):
        del params
        base_key = jax.random.wrap_key_data(state.key, impl=impl)
        noise = _draws.tree_noise(
            base_key, state.count, updates, std_at(state.count), distribution, cyclic
        )
        updates = jax.tree.map(
            lambda u, xi: u if xi is None else _perturbed(u, unit, xi), updates, noise
        )
        return updates, IndependentNoiseState(
            count=optax.safe_increment(state.count), key=state.key
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _carries_noise(leaf: Any) -> bool:
    return leaf is not None and not isinstance(leaf, optax.MaskedNode)


def _leaves(tree: Any) -> list[Any]:
    return [leaf for _, leaf in _trees.entries(tree)[0]]


def add_correlated_noise(
    noise_std: optax.ScalarOrSchedule,
    key: _keys.Key,
    *,
    coefficients: jax.typing.ArrayLike,
    leaves: Leaves = "all",
    distribution: Distribution = "gaussian",
    store_noise: bool = True,
) -> optax.GradientTransformation:
    r"""Adds a linear filter of i.i.d. noise to the updates: correlated noise.

    .. math::

        u_n \leftarrow u_n + \sum_{j=0}^{K-1} c_j \, \xi_{n+1-j},
        \qquad \xi_m = \sigma(m) z_m,

    with :math:`z_m` i.i.d. standard normal (or Rademacher) per element and
    :math:`n` the pre-increment update count. ``init`` draws the pre-history
    :math:`\xi_0, \xi_{-1}, \ldots, \xi_{2-K}` at scale :math:`\sigma(0)`, so
    every step has the same law: variance :math:`\sigma^2 \sum_j c_j^2` and
    lag-:math:`k` covariance :math:`\sigma^2 \sum_j c_j c_{j+k}` per element.
    Anti-PGD is :math:`c = (1, -1)` (:func:`add_anticorrelated_noise`);
    fractional noise is :func:`add_fractional_noise`.

    When a schedule brings :math:`\sigma` to 0 the draws stop; a filter whose
    coefficients sum to 0 then takes out all the noise it put in within
    :math:`K - 1` steps, and later steps add exactly nothing.

    By default the state keeps the :math:`K - 1` past draws in a ring: one
    params-sized tree per past tap, in the params' dtypes and sharded like
    them. ``store_noise=False`` keeps none and regenerates them from the key
    (:math:`K` draws per step, a state of a few bytes); the updates are the
    same to rounding, also when :math:`\sigma` changes under
    :func:`optax.inject_hyperparams`, since the state records the scale of
    every past draw. With stored noise, ``update`` refuses a tree other than
    the one ``init`` saw (other paths or shapes); ``store_noise=False``
    draws for the tree it is given, and :func:`denoised_params` checks it.

    Args:
      noise_std: The standard deviation :math:`\sigma` of :math:`\xi`, a float
        :math:`\geq 0` or a schedule of the update count.
      key: An int seed, a raw ``uint32`` key (``jax.random.PRNGKey``), a typed
        key (``jax.random.key``, any impl) or a scalar integer array; it may
        be a tracer.
      coefficients: The filter :math:`(c_0, \ldots, c_{K-1})`, a non-empty 1-D
        sequence of finite floats; it may be traced (a sweep over filters of
        one length under ``jax.vmap``).
      leaves: ``"all"`` or ``"cyclic"`` (:math:`\xi_m` is zero except on float
        leaf :math:`m \bmod L`, tree order: layer-wise noise).
      distribution: ``"gaussian"`` or ``"rademacher"``.
      store_noise: Whether the state stores the past draws (faster) or
        regenerates them (less memory).

    Returns:
      A :class:`optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_antipgd as ap
      >>> noise = ap.add_correlated_noise(0.1, key=0, coefficients=(1.0, -0.5, -0.5))
      >>> opt = optax.chain(optax.sgd(0.1), noise)
      >>> params = jnp.zeros(4)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.ones(4), state)
      >>> len(state[1].noise)  # a ring of K - 1 = 2 past draws
      2
    """
    std_at = _noise_std_fn(noise_std)
    coefficients = _filters.check_coefficients(coefficients)
    num_slots = coefficients.shape[0] - 1
    cyclic = _check_choice("leaves", leaves, _keys.LEAVES_CODES) == "cyclic"
    distribution = _check_choice("distribution", distribution, _keys.DISTRIBUTION_CODES)
    impl = _keys.key_impl(key)
    codes = (
        _keys.impl_code(impl),
        _keys.DISTRIBUTION_CODES[distribution],
        _keys.LEAVES_CODES[leaves],
    )
    if not store_noise and codes[0] < 0:
        raise ValueError(
            "store_noise=False needs a key of a built-in impl (threefry2x32, rbg, "
            f"unsafe_rbg) so that the noise can be regenerated; got impl {impl}."
        )

    def draw(base_key, step, tree, scale):
        return _draws.tree_noise(base_key, step, tree, scale, distribution, cyclic)

    def init_fn(params):
        _trees.check_leaves(params)
        count = jnp.zeros([], jnp.int32)
        raw_key = _keys.key_data(key)
        std = std_at(count)
        ring = ()
        if store_noise:
            base_key = jax.random.wrap_key_data(raw_key, impl=impl)
            # xi_0, xi_{-1}, ..., xi_{2-K}; slot m mod (K - 1) holds xi_m.
            by_slot = {
                step % num_slots: draw(
                    base_key, jnp.asarray(step, jnp.int32), params, std
                )
                for step in range(2 - num_slots - 1, 1)
            }
            ring = tuple(by_slot[slot] for slot in range(num_slots))
        return CorrelatedNoiseState(
            count=count,
            key=raw_key,
            coefficients=coefficients,
            noise_std=jnp.full([num_slots], std),
            noise=ring,
            sampler=jnp.asarray(codes, jnp.int32),
            digest=jnp.asarray(_trees.digest(params)),
        )

    def update_fn(updates, state, params=None):
        del params
        base_key = jax.random.wrap_key_data(state.key, impl=impl)
        next_count = optax.safe_increment(state.count)
        next_std = std_at(next_count)
        lags = _lags(state.count, num_slots) + 1  # slot s holds xi_{n+1-lag_s}
        if store_noise and num_slots:
            template, ring = state.noise[0], state.noise
            positions = _trees.align(template, updates, "updates", dtypes=False)
        else:
            if not isinstance(state.digest, jax.core.Tracer):
                _check_digest(state, updates, "updates")
            template = updates
            positions = range(len(_trees.entries(updates)[0]))
            ring = tuple(
                draw(base_key, next_count - lags[slot], updates, state.noise_std[slot])
                for slot in range(num_slots)
            )
        new = draw(base_key, next_count, template, next_std)
        weights = (coefficients[0], *(coefficients[lags[s]] for s in range(num_slots)))
        noises = list(zip(_leaves(new), *map(_leaves, ring), strict=True))
        entries, treedef = _trees.entries(updates)
        perturbed = [
            _perturbed(update, weights, *noises[position])
            if _carries_noise(update) and _carries_noise(noises[position][0])
            else update
            for (_, update), position in zip(entries, positions, strict=True)
        ]
        noise_std = jnp.asarray(state.noise_std)
        if num_slots:
            slot = jnp.mod(next_count, num_slots)
            noise_std = noise_std.at[slot].set(next_std)
            if store_noise:
                ring = _ring_write(state.noise, slot, new)
        return treedef.unflatten(perturbed), state._replace(
            count=next_count,
            coefficients=coefficients,
            noise_std=noise_std,
            noise=ring if store_noise else (),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _lags(count: jax.Array, num_slots: int) -> Any:
    """``n - m`` for the step ``m`` whose draw slot ``s`` of the ring holds.

    At count ``n`` the ring holds ``xi_n, ..., xi_{n+2-K}``, ``xi_m`` in slot
    ``m mod (K - 1)``. With one slot the lag is 0 at every step: a Python
    constant, so that XLA sees Anti-PGD's constant coefficients.
    """
    if num_slots == 1:
        return np.zeros(1, np.int32)
    return jnp.mod(count - jnp.arange(num_slots), max(num_slots, 1))


def _ring_write(ring: tuple[Any, ...], slot: jax.Array, new: Any) -> tuple[Any, ...]:
    """``ring`` with ``new`` in ``slot``, the other slots as they were.

    XLA cannot write one slot of a tuple chosen at run time in place, and it
    copied a stacked ring on every in-place variant measured on CPU, so each
    slot is rewritten once with a select (a single slot is simply replaced).
    """
    if len(ring) == 1:
        return (new,)
    return tuple(
        jax.tree.map(lambda n, o, s=s: jnp.where(slot == s, n, o), new, old)
        for s, old in enumerate(ring)
    )


def _check_digest(state: CorrelatedNoiseState, tree: Any, what: str) -> None:
    """Refuses ``tree`` if it is not the tree ``init`` saw, where that is known.

    The digest is compared when the state is concrete; under ``jax.jit`` (a
    traced state) a host callback raises at run time.
    """
    expected = _trees.digest(tree)
    message = (
        f"{what} is not the tree the noise state was built for (by init): its "
        "paths or shapes differ. Pass the tree given to opt.init: e.g. "
        "params, not {'params': params}, and nnx.state(model, nnx.Param), not "
        "nnx.state(model)."
    )

    def check(digest):
        if not np.array_equal(np.asarray(digest), expected):
            raise ValueError(message)

    if isinstance(state.digest, jax.core.Tracer):
        jax.debug.callback(check, state.digest)
    else:
        check(state.digest)


def add_anticorrelated_noise(
    noise_std: optax.ScalarOrSchedule,
    key: _keys.Key,
    *,
    correlation: jax.typing.ArrayLike = 1.0,
    leaves: Leaves = "all",
    distribution: Distribution = "gaussian",
    store_noise: bool = True,
) -> optax.GradientTransformation:
    r"""Adds anticorrelated noise to the updates: the perturbation of Anti-PGD.

    .. math::

        u_n \leftarrow u_n + \xi_{n+1} - c \, \xi_n, \qquad \xi_n = \sigma(n) z_n,

    with :math:`z_n` i.i.d. standard normal (or Rademacher), :math:`n` the
    pre-increment update count and :math:`c` the ``correlation``. ``init``
    draws :math:`\xi_0`, so every step has the same law: variance
    :math:`(1 + c^2)\sigma^2` and lag-1 autocorrelation :math:`-c/(1 + c^2)`.
    With :math:`c = 1` (Anti-PGD) the perturbations telescope: after :math:`N`
    steps the weights carry :math:`\xi_N - \xi_0`, not a random walk, and to
    second order this minimises :math:`L(w) + \frac{\sigma^2}{2}
    \operatorname{Tr} \nabla^2 L(w)`. The noise-free iterate
    :math:`w_n - \xi_n` is :func:`denoised_params`. :math:`0 < c < 1` is
    partial anticorrelation (the form of DP-:math:`\lambda`-CGD); :math:`c = 0`
    is independent noise.

    This is :func:`add_correlated_noise` with coefficients :math:`(1, -c)`;
    its state stores :math:`\xi_n` (``state.noise[0]``), or with
    ``store_noise=False`` regenerates it from the key. ``correlation`` may be
    traced (``jax.vmap`` over it, or :func:`optax.inject_hyperparams`).

    Args:
      noise_std: The standard deviation :math:`\sigma` of :math:`\xi`, a float
        :math:`\geq 0` or a schedule of the update count.
      key: An int seed, a raw ``uint32`` key (``jax.random.PRNGKey``), a typed
        key (``jax.random.key``, any impl) or a scalar integer array; it may
        be a tracer.
      correlation: :math:`c \in [0, 1]`; 1 is Anti-PGD.
      leaves: ``"all"`` or ``"cyclic"`` (one float leaf per step, in turn).
      distribution: ``"gaussian"`` or ``"rademacher"`` (:math:`\pm\sigma`,
        the same covariance, hence the same regulariser, from one random bit
        per element).
      store_noise: Whether the state stores :math:`\xi_n` (faster) or
        regenerates it (less memory).

    Returns:
      A :class:`optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_antipgd as ap
      >>> opt = optax.chain(optax.sgd(0.1), ap.add_anticorrelated_noise(0.01, 0))
      >>> params = jnp.zeros(3)
      >>> state = opt.init(params)
      >>> noise_0 = state[1].noise[0]  # xi_0, drawn by init
      >>> for _ in range(3):
      ...     updates, state = opt.update(jnp.ones(3), state)
      ...     params = optax.apply_updates(params, updates)
      >>> # The perturbations telescope: params = -3 * 0.1 + xi_3 - xi_0.
      >>> bool(jnp.allclose(params, -0.3 + state[1].noise[0] - noise_0))
      True

    References:
      Orvieto et al, `Anticorrelated Noise Injection for Improved
      Generalization <https://arxiv.org/abs/2202.02831>`_, 2022

      Koloskova et al, `Gradient Descent with Linearly Correlated Noise:
      Theory and Applications to Differential Privacy
      <https://arxiv.org/abs/2302.01463>`_, 2023
    """
    return add_correlated_noise(
        noise_std,
        key,
        coefficients=_filters.anticorrelated_coefficients(correlation),
        leaves=leaves,
        distribution=distribution,
        store_noise=store_noise,
    )


def add_fractional_noise(
    noise_std: optax.ScalarOrSchedule,
    key: _keys.Key,
    *,
    hurst: float,
    num_taps: int = 8,
    leaves: Leaves = "all",
    distribution: Distribution = "gaussian",
    store_noise: bool = True,
) -> optax.GradientTransformation:
    r"""Adds fractional noise to the updates: the perturbation of fPGD.

    .. math::

        u_n \leftarrow u_n + \sum_{j=0}^{K-1} c_j \, \xi_{n+1-j},
        \qquad c = \texttt{fractional\_coefficients}(H, K),

    the first :math:`K` coefficients of the moving-average representation of
    fractional Gaussian noise with Hurst exponent :math:`H`, normalised to
    unit norm: the perturbations approximate fGn of scale :math:`\sigma`,
    :math:`\operatorname{Cov}(p_n, p_{n+k}) \approx \frac{\sigma^2}{2}
    (|k+1|^{2H} - 2|k|^{2H} + |k-1|^{2H})` (the accuracy of the truncation is
    tabled in :func:`fractional_coefficients`). :math:`H = 1/2` is PGD's law,
    :math:`H < 1/2` anticorrelated (:math:`H \to 0`: Anti-PGD's), :math:`H >
    1/2` positively correlated. This is :func:`add_correlated_noise` with
    those coefficients, and keeps :math:`K - 1` past draws (or regenerates
    them with ``store_noise=False``).

    Args:
      noise_std: The standard deviation :math:`\sigma`, a float :math:`\geq 0`
        or a schedule of the update count.
      key: An int seed, a raw ``uint32`` key, a typed key or a scalar integer
        array; it may be a tracer.
      hurst: The Hurst exponent :math:`H \in (0, 1)`, a concrete float (see
        :func:`fractional_coefficients` for sweeps under ``jax.jit``).
      num_taps: The filter length :math:`K \geq 1`.
      leaves: ``"all"`` or ``"cyclic"`` (one float leaf per step, in turn).
      distribution: ``"gaussian"`` or ``"rademacher"``.
      store_noise: Whether the state stores the past draws or regenerates them.

    Returns:
      A :class:`optax.GradientTransformation`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_antipgd as ap
      >>> noise = ap.add_fractional_noise(0.01, key=0, hurst=0.25)
      >>> opt = optax.chain(optax.sgd(0.1), noise)
      >>> state = opt.init(jnp.zeros(3))
      >>> updates, state = opt.update(jnp.ones(3), state)
      >>> len(state[1].noise)  # the 7 past draws of an 8-tap filter
      7

    References:
      Lucchi et al, `On the Theoretical Properties of Noise Correlation in
      Stochastic Optimization <https://arxiv.org/abs/2209.09162>`_, 2022
    """
    return add_correlated_noise(
        noise_std,
        key,
        coefficients=_filters.fractional_coefficients(hurst, num_taps),
        leaves=leaves,
        distribution=distribution,
        store_noise=store_noise,
    )


def _noise_states(opt_state: Any) -> list[CorrelatedNoiseState]:
    return [
        state
        for _, state in optax.tree_utils.tree_get_all_with_path(
            opt_state, CorrelatedNoiseState.__name__
        )
    ]


def denoised_params(opt_state: optax.OptState, params: optax.Params) -> optax.Params:
    r"""The noise-free iterate: the weights without the noise still in them.

    Anti-PGD's weights are :math:`w_n = v_n + \xi_n`, where :math:`v_n` follows
    plain gradient descent evaluated at the perturbed weights,
    :math:`v_{n+1} = v_n - \eta \nabla L(w_n)`; this returns :math:`v_n`.
    Evaluate a model on it to see where the optimizer is heading without the
    noise. For a filter :math:`c` of :math:`K` coefficients it subtracts
    :math:`\sum_{j=0}^{K-2} D_j \xi_{n-j}`, :math:`D_j = c_0 + \ldots + c_j`:
    the noise the filter has put into the weights and will take out again.
    When the coefficients sum to 0 (Anti-PGD, any :math:`(1, -1)`-like
    filter) that is all the noise, and :math:`v_{n+1} = v_n - \eta \nabla
    L(w_n)` holds exactly. When they sum to :math:`s \neq 0` (partial
    anticorrelation, fractional noise) the weights also carry :math:`s` times
    the random walk of the draws that left the filter, which no state records:
    the result is then the weights without the noise in flight, not a
    noise-free iterate.

    ``opt_state`` may be any optax state that contains the state of a
    correlated noise transform (inside ``optax.chain``, ``optax.masked``,
    ``optax.inject_hyperparams``, ...); if it contains several, the noise of
    each is removed. ``params`` must be the tree ``init`` saw (the same paths,
    shapes and dtypes): anything else is refused. A ``store_noise=False``
    state regenerates the noise from the key; such a state records no mask, so
    inside ``optax.masked`` (or ``optax.partition``) it is refused.

    Args:
      opt_state: An optimizer state containing a
        :class:`CorrelatedNoiseState`.
      params: The current parameters :math:`w_n`, the tree given to ``init``.

    Returns:
      :math:`v_n`, with the structure and dtypes of ``params``.

    Raises:
      ValueError: If ``opt_state`` holds no correlated noise state, if
        ``params`` is not the tree the state was built for, or for a
        ``store_noise=False`` state inside ``optax.masked``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_antipgd as ap
      >>> opt = ap.anti_pgd(learning_rate=0.1, noise_std=0.5, key=0)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = opt.init(params)
      >>> # init drew xi_0: the noise-free iterate starts at w_0 - xi_0.
      >>> clean = ap.denoised_params(state, params)
      >>> bool(jnp.all(clean["w"] == -state[1].noise[0]["w"]))
      True
    """
    states = _noise_states(opt_state)
    if not states:
        raise ValueError(
            "opt_state holds no CorrelatedNoiseState: denoised_params needs the "
            "state of add_anticorrelated_noise, add_correlated_noise, "
            "add_fractional_noise, anti_pgd or fractional_pgd."
        )
    masked = [
        state
        for _, masked_state in optax.tree_utils.tree_get_all_with_path(
            opt_state, optax.MaskedState.__name__
        )
        for state in _noise_states(masked_state)
    ]
    if any(not state.noise and state.noise_std.shape[0] for state in masked):
        raise ValueError(
            "denoised_params cannot tell which leaves optax.masked excluded from "
            "the noise of a store_noise=False state; use store_noise=True."
        )
    for state in states:
        params = _denoised(state, params)
    return params


def _denoised(state: CorrelatedNoiseState, params: Any) -> Any:
    num_slots = state.noise_std.shape[0]
    if not num_slots:
        return params
    lags = _lags(state.count, num_slots)  # slot s holds xi_{n-lag_s}, weight D_lag
    weights = jnp.cumsum(state.coefficients)[lags]
    if state.noise:
        ring = state.noise
        positions = _trees.align(ring[0], params, "params", dtypes=True)
    else:
        _check_digest(state, params, "params")
        ring = tuple(
            _regenerated(state, state.count - lags[slot], params, state.noise_std[slot])
            for slot in range(num_slots)
        )
        positions = range(len(_trees.entries(params)[0]))
    noises = list(zip(*map(_leaves, ring), strict=True))
    entries, treedef = _trees.entries(params)
    weights = tuple(weights[slot] for slot in range(num_slots))
    return treedef.unflatten(
        [
            _without(param, weights, noises[position])
            if _carries_noise(param) and _carries_noise(noises[position][0])
            else param
            for (_, param), position in zip(entries, positions, strict=True)
        ]
    )


def _without(param, weights, noises):
    """``param - sum_s weights_s noises_s`` in the param's dtype."""
    dtype = jnp.result_type(param)
    terms = [
        w.astype(dtype) * noise.astype(dtype)
        for w, noise in zip(weights, noises, strict=True)
    ]
    return param - functools.reduce(operator.add, terms)


def _regenerated(state, step, tree, scale):
    """The noise a ``store_noise=False`` state drew at ``step``, in ``tree``'s dtypes.

    The key impl, distribution and leaves are read from the state's codes;
    under ``jax.jit`` (traced codes) every combination whose key has the
    state's key shape is compiled and one is picked with ``lax.switch``.
    """
    impls = {code: impl for impl, code in _keys.IMPL_CODES.items()}
    distributions = {code: d for d, code in _keys.DISTRIBUTION_CODES.items()}

    def draw(impl_code, distribution_code, leaves_code):
        key = jax.random.wrap_key_data(state.key, impl=impls[impl_code])
        return _draws.tree_noise(
            key, step, tree, scale, distributions[distribution_code], leaves_code == 1
        )

    if not isinstance(state.sampler, jax.core.Tracer):
        return draw(*(int(code) for code in np.asarray(state.sampler)))
    combinations = [
        (impl_code, distribution_code, leaves_code)
        for impl, impl_code in _keys.IMPL_CODES.items()
        if _keys.key_shape(impl) == state.key.shape
        for distribution_code in _keys.DISTRIBUTION_CODES.values()
        for leaves_code in _keys.LEAVES_CODES.values()
    ]
    matches = jnp.stack(
        [jnp.all(state.sampler == jnp.asarray(c, jnp.int32)) for c in combinations]
    )
    return jax.lax.switch(
        jnp.argmax(matches),
        [functools.partial(draw, *combination) for combination in combinations],
    )
