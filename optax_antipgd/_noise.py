"""The noise transforms, their states, and the noise-free iterate."""

import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_antipgd import _sampling


class IndependentNoiseState(NamedTuple):
    """State of :func:`add_independent_noise`."""

    count: jax.Array  # int32 [], the number of updates so far.
    key: jax.Array  # uint32 [key size], raw data of the base key.


class AnticorrelatedNoiseState(NamedTuple):
    """State of :func:`add_anticorrelated_noise`.

    ``noise`` holds the perturbation ``xi_n`` with the structure of the params:
    the leaf's dtype at each float leaf, ``None`` at int and bool leaves (which
    ``init`` decides once, from the params). With ``store_noise=False`` it is
    ``None``: ``xi_n`` is regenerated from ``key``, ``count`` and
    ``noise_std``, at the float leaves of the updates.
    """

    count: jax.Array  # int32 [], n: the number of updates so far.
    key: jax.Array  # uint32 [key size], raw data of the base key.
    noise_std: jax.Array  # float32 [], sigma(n), the scale of xi_n.
    noise: optax.Updates | None  # xi_n, like the params, or None (see above).
    sampler: jax.Array  # int32 [], index of (key impl, distribution) in SAMPLERS.


def _noise_std_fn(noise_std: optax.ScalarOrSchedule):
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


def add_independent_noise(
    noise_std: optax.ScalarOrSchedule,
    key: Any,
    *,
    distribution: str = "gaussian",
) -> optax.GradientTransformation:
    r"""Adds i.i.d. noise to the updates: the perturbation of PGD.

    .. math::

        u_n \leftarrow u_n + \xi_n, \qquad \xi_n = \sigma(n) z_n,

    where :math:`z_n` is standard normal (or Rademacher, :math:`\pm 1`), drawn
    afresh at every step, and :math:`n` is the pre-increment update count. The
    noise of a leaf is a pure function of ``key``, :math:`n` and the leaf's
    path, so adding a leaf leaves the others' noise unchanged and every process
    of a multi-host job draws the same numbers.

    Noise is drawn in float32 (float64 for float64 leaves), scaled, then cast to
    the leaf's dtype, with the leaf's sharding; int and bool leaves pass through
    untouched. When :math:`\sigma(n) = 0` the draw is skipped.

    Scaling out: a replicated state (the same ``count`` and ``key`` on every
    replica, as ``init`` gives) draws identical noise on every replica, so
    data-parallel replicas that apply the same (``lax.pmean``-ed) gradients
    stay bit-identical. Under sharded ``jit`` each device draws only its block
    of the noise, with no communication, and the result does not depend on the
    number of devices (with the default threefry keys). Inside ``shard_map``
    each device's block is a whole tree to the transform: with one key every
    block draws the same noise; for independent blocks, build the optimizer
    inside the mapped function with
    ``key=jax.random.fold_in(key, jax.lax.axis_index(axis))``.

    Args:
      noise_std: The standard deviation :math:`\sigma` of the noise, a float
        :math:`\geq 0` or a schedule of the update count.
      key: An int seed, a raw ``uint32`` key (``jax.random.PRNGKey``), a typed
        key (``jax.random.key``, any impl) or a scalar integer array; it may
        be a tracer.
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
    """
    std_at = _noise_std_fn(noise_std)
    distribution = _sampling.check_distribution(distribution)
    impl = _sampling.key_impl(key)

    def init_fn(params):
        del params
        return IndependentNoiseState(
            count=jnp.zeros([], jnp.int32), key=_sampling.key_data(key)
        )

    def update_fn(updates, state, params=None):
        del params
        base_key = jax.random.wrap_key_data(state.key, impl=impl)
        noise = _sampling.tree_noise(
            base_key, state.count, updates, std_at(state.count), distribution
        )
        updates = jax.tree.map(_add, updates, noise)
        return updates, IndependentNoiseState(
            count=optax.safe_increment(state.count), key=state.key
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _add(update, noise):
    return update if noise is None else update + noise


def add_anticorrelated_noise(
    noise_std: optax.ScalarOrSchedule,
    key: Any,
    *,
    distribution: str = "gaussian",
    store_noise: bool = True,
) -> optax.GradientTransformation:
    r"""Adds anticorrelated noise to the updates: the perturbation of Anti-PGD.

    .. math::

        u_n \leftarrow u_n + \xi_{n+1} - \xi_n, \qquad \xi_n = \sigma(n) z_n,

    with :math:`z_n` i.i.d. standard normal (or Rademacher) and :math:`n` the
    pre-increment update count. ``init`` draws :math:`\xi_0`, so every step has
    the same law. Consecutive perturbations are anticorrelated (coefficient
    :math:`-1/2`) and telescope: after :math:`N` steps the weights carry
    :math:`\xi_N - \xi_0`, not a random walk. To second order this minimises
    :math:`L(w) + \frac{\sigma^2}{2} \operatorname{Tr} \nabla^2 L(w)`. The
    noise-free iterate :math:`w_n - \xi_n` is :func:`denoised_params`.

    When a schedule brings :math:`\sigma` to 0, the next step cancels the last
    noise and later steps add exactly nothing (the draws are skipped).

    By default the state stores :math:`\xi_n`: one params-sized tree in the
    params' dtypes, sharded like the params, so each device holds its own
    block of it. ``store_noise=False`` keeps none and regenerates
    :math:`\xi_n` from the key (twice the draws, a state of a few bytes); the
    updates are the same to rounding, also when ``noise_std`` changes between
    steps under :func:`optax.inject_hyperparams`, since the state records the
    scale of :math:`\xi_n`.

    Scaling out is as for :func:`add_independent_noise`: a replicated state
    draws identical noise on every replica, and sharded ``jit`` draws each
    device's block locally.

    Args:
      noise_std: The standard deviation :math:`\sigma` of :math:`\xi`, a float
        :math:`\geq 0` or a schedule of the update count.
      key: An int seed, a raw ``uint32`` key (``jax.random.PRNGKey``), a typed
        key (``jax.random.key``, any impl) or a scalar integer array; it may
        be a tracer.
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
      >>> noise_0 = state[1].noise  # xi_0, drawn by init
      >>> for _ in range(3):
      ...     updates, state = opt.update(jnp.ones(3), state)
      ...     params = optax.apply_updates(params, updates)
      >>> # The perturbations telescope: params = -3 * 0.1 + xi_3 - xi_0.
      >>> bool(jnp.allclose(params, -0.3 + state[1].noise - noise_0))
      True

    References:
      Orvieto et al, `Anticorrelated Noise Injection for Improved
      Generalization <https://arxiv.org/abs/2202.02831>`_, 2022
    """
    std_at = _noise_std_fn(noise_std)
    distribution = _sampling.check_distribution(distribution)
    impl = _sampling.key_impl(key)
    sampler = _sampling.sampler_index(impl, distribution)
    if not store_noise and sampler < 0:
        raise ValueError(
            "store_noise=False needs a key of a built-in impl (threefry2x32, rbg, "
            f"unsafe_rbg) so that the noise can be regenerated; got impl {impl}."
        )

    def init_fn(params):
        count = jnp.zeros([], jnp.int32)
        raw_key = _sampling.key_data(key)
        std = std_at(count)
        if store_noise:
            base_key = jax.random.wrap_key_data(raw_key, impl=impl)
            noise = _sampling.tree_noise(base_key, count, params, std, distribution)
        else:
            noise = None
        return AnticorrelatedNoiseState(
            count=count,
            key=raw_key,
            noise_std=std,
            noise=noise,
            sampler=jnp.asarray(sampler, jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        base_key = jax.random.wrap_key_data(state.key, impl=impl)
        next_count = optax.safe_increment(state.count)
        next_std = std_at(next_count)
        noised = _noised_leaves(updates, state.noise) if store_noise else updates
        next_noise = _sampling.tree_noise(
            base_key, next_count, noised, next_std, distribution
        )
        if store_noise:
            noise = state.noise
            stored = next_noise
        else:
            noise = _sampling.tree_noise(
                base_key, state.count, noised, state.noise_std, distribution
            )
            stored = state.noise
        updates = jax.tree.map(_add_difference, updates, next_noise, noise)
        return updates, AnticorrelatedNoiseState(
            count=next_count,
            key=state.key,
            noise_std=next_std,
            noise=stored,
            sampler=state.sampler,
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _carries_noise(leaf_noise: Any) -> bool:
    return leaf_noise is not None and not isinstance(leaf_noise, optax.MaskedNode)


def _noised_leaves(tree: Any, noise: Any) -> Any:
    """``tree`` at the leaves where the state's ``noise`` carries noise."""
    return jax.tree.map(
        lambda leaf, leaf_noise: leaf if _carries_noise(leaf_noise) else None,
        tree,
        noise,
    )


def _add_difference(update, next_noise, noise):
    return update if next_noise is None else update + (next_noise - noise)


def _find(node_type: type, tree: Any) -> list[Any]:
    """The nodes of type ``node_type`` in ``tree``, outermost first."""
    is_node = lambda x: isinstance(x, node_type)  # noqa: E731
    return [x for x in jax.tree.leaves(tree, is_leaf=is_node) if is_node(x)]


def denoised_params(opt_state: optax.OptState, params: optax.Params) -> optax.Params:
    r"""The noise-free iterate :math:`v_n = w_n - \xi_n` of Anti-PGD.

    Anti-PGD's weights are :math:`w_n = v_n + \xi_n`, where :math:`v_n` follows
    plain gradient descent evaluated at the perturbed weights,
    :math:`v_{n+1} = v_n - \eta \nabla L(w_n)`. Evaluate a model on
    :math:`v_n` to see where the optimizer is heading without the noise.

    ``opt_state`` may be any optax state that contains the state of
    :func:`add_anticorrelated_noise` (inside ``optax.chain``, ``optax.masked``,
    ``optax.inject_hyperparams``, ...). If it contains several, the noise of
    each is removed. With ``store_noise=False`` the noise is regenerated from
    the key at every float leaf of ``params``; such a state records no mask, so
    inside ``optax.masked`` (or ``optax.partition``) it is refused: use
    ``store_noise=True`` there.

    Args:
      opt_state: An optimizer state containing an
        :class:`AnticorrelatedNoiseState`.
      params: The current parameters :math:`w_n`, with the structure of the
        updates that the noise transform sees.

    Returns:
      :math:`w_n - \xi_n`, with the structure and dtypes of ``params``.

    Raises:
      ValueError: If ``opt_state`` holds no anticorrelated noise state, or a
        ``store_noise=False`` one inside ``optax.masked``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_antipgd as ap
      >>> opt = ap.anti_pgd(learning_rate=0.1, noise_std=0.5, key=0)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = opt.init(params)
      >>> ap.denoised_params(state, params)["w"].shape
      (2,)
    """
    states = _find(AnticorrelatedNoiseState, opt_state)
    if not states:
        raise ValueError(
            "opt_state holds no AnticorrelatedNoiseState: denoised_params needs "
            "the state of add_anticorrelated_noise or anti_pgd."
        )
    masked = _find(AnticorrelatedNoiseState, _find(optax.MaskedState, opt_state))
    if any(state.noise is None for state in masked):
        raise ValueError(
            "denoised_params cannot tell which leaves optax.masked excluded from "
            "the noise of a store_noise=False state; use store_noise=True."
        )
    for state in states:
        noise = state.noise
        if noise is None:
            noise = _sampling.recorded_tree_noise(
                state.sampler, state.key, state.count, params, state.noise_std
            )
        params = jax.tree.map(_subtract, params, noise)
    return params


def _subtract(param, noise):
    if not _carries_noise(noise):
        return param
    return param - noise.astype(jnp.result_type(param))
