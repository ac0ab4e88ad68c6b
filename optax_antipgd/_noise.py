"""The noise transforms: one linear filter of one i.i.d. stream per leaf.

Update ``n`` (the pre-increment count) adds ``sum_j c_j xi_{n-j}`` with
``xi_m = sigma(m) z_m`` (``_draws``, ``_keys``) and a filter ``c``
(``_filters``): PGD is ``(1,)``, Anti-PGD ``(1, -1)``. The ``K - 1`` past
draws are kept in the state, in a ring of ``K`` slots (slot ``m mod K``
holds ``xi_m``), or regenerated from the key.
:func:`denoised_params` subtracts the noise the filter still has in flight,
with the same function that adds it (:func:`_apply_filter`).
"""

from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_antipgd import _draws
from optax_antipgd import _filters
from optax_antipgd import _keys
from optax_antipgd import _trees

Distribution = Literal["gaussian", "rademacher"]
Leaves = Literal["all", "cyclic"]

# The checkpoint format: what a state records of the way its noise is drawn,
# as explicit codes (tests/test_noise.py pins them). A code never changes
# meaning; append new entries, never renumber. LAW is the version of the
# noise law: 1 since 0.2 (update n draws xi_n at sigma(n)); 0.1's correlated
# family drew xi_{n+1}, and its states have a 3-code sampler.
LAW = 1
IMPL_CODES = {"threefry2x32": 0, "rbg": 1, "unsafe_rbg": 2}
DISTRIBUTION_CODES = {"gaussian": 0, "rademacher": 1}
LEAVES_CODES = {"all": 0, "cyclic": 1}


class CorrelatedNoiseState(NamedTuple):
    """The state of every noise transform of the family.

    At update count ``n`` a filter of ``K`` coefficients needs the ``K - 1``
    past draws ``xi_{n-1}, ..., xi_{n-K+1}``. Every field is a plain array,
    fixed in structure, shape and dtype by ``init`` (``float`` below is
    float64 when the params have a float64 leaf, float32 otherwise); this is
    the checkpoint format.
    """

    # int32 []: n, the number of updates so far; the step of the next draw.
    count: jax.Array
    # uint32 [key size]: the raw data of the base key.
    key: jax.Array
    # float [K]: the filter, for denoised_params (the transform has its own).
    coefficients: jax.Array
    # float [max(K - 1, 1)]: sigma of xi_{n-1}, ..., xi_{n-K+1} (of xi_{n-1}
    # for one tap: Orbax cannot save an empty array). With store_noise=False
    # the draws are redone at these scales (exact under inject_hyperparams);
    # in both modes, all zero means no noise is in flight, so a step with
    # sigma 0 can skip the noise entirely.
    noise_std: jax.Array
    # The ring of draws: a tree like the params whose float leaves are
    # [K, *shape] in the dtype init saw, slot m mod K holding xi_m (None at
    # the other leaves): xi_{n-1}, ..., xi_{n-K+1} and a spare slot, which
    # update n writes xi_n into before the filter reads the ring (_ring).
    # () with store_noise=False or one tap.
    noise: Any
    # int32 [4]: codes of the law, key impl, distribution and leaves: how to
    # redraw the noise (store_noise=False), and what a checkpoint holds.
    sampler: jax.Array
    # uint32 [2]: digest of the paths and shapes of init's tree: with
    # store_noise=False, how update and denoised_params know that the past
    # draws they regenerate are that tree's (one tap has none: any tree).
    digest: jax.Array


IndependentNoiseState = CorrelatedNoiseState
AnticorrelatedNoiseState = CorrelatedNoiseState


def _noise_std_fn(noise_std: optax.ScalarOrSchedule) -> Callable[[Any], jax.Array]:
    """Validates ``noise_std`` and returns ``count -> sigma(count)``."""
    if callable(noise_std):
        return lambda count: jnp.asarray(noise_std(count))
    is_number = isinstance(noise_std, (int, float, np.ndarray, np.generic, jax.Array))
    if (
        not is_number
        or isinstance(noise_std, (bool, np.bool_))
        or not jnp.issubdtype(jnp.result_type(noise_std), jnp.number)
    ):
        raise TypeError(f"noise_std must be a number or a schedule, got {noise_std!r}.")
    if jnp.ndim(noise_std) != 0:
        raise ValueError(
            "noise_std must be a scalar or a schedule, "
            f"got shape {jnp.shape(noise_std)}."
        )
    if isinstance(noise_std, jax.core.Tracer):
        return lambda count: jnp.asarray(noise_std)
    value = np.asarray(noise_std)
    if not value >= 0:  # also NaN
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}.")
    # A constant stays concrete under jit, so the draw knows it is not 0.
    return lambda count: value


def _check_choice(name: str, value: Any, choices: dict[str, int]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return bool(value)


def _apply_filter(tree, weights, noises, positions):
    """``tree + sum_j weights[j] * noises[j]`` at the float leaves that carry noise.

    ``noises`` are trees, ``positions[j][i]`` the entry of ``noises[j]``
    that entry ``i`` of ``tree`` is (:func:`optax_antipgd._trees.match`).
    Each sum is computed in the wider of the leaf's and the noise's dtype and
    returned in the leaf's. The one place the filter meets the weights: the
    update adds ``c_j xi_{n-j}``, :func:`denoised_params` subtracts what is
    in flight.
    """
    entries, treedef = _trees.entries(tree)
    noise_entries = [[leaf for _, leaf in _trees.entries(n)[0]] for n in noises]
    out = []
    for i, (_, leaf) in enumerate(entries):
        terms = [
            noise[where[i]]
            for noise, where in zip(noise_entries, positions, strict=True)
        ]
        if not _trees.carries_noise(leaf) or not all(map(_trees.carries_noise, terms)):
            out.append(leaf)
            continue
        dtype = jnp.promote_types(jnp.result_type(leaf), jnp.result_type(terms[0]))
        total = leaf.astype(dtype)
        perturbation = None
        for weight, term in zip(weights, terms, strict=True):
            product = jnp.asarray(weight).astype(dtype) * term.astype(dtype)
            perturbation = product if perturbation is None else perturbation + product
        out.append((total + perturbation).astype(jnp.result_type(leaf)))
    return treedef.unflatten(out)


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

        u_n \leftarrow u_n + \sum_{j=0}^{K-1} c_j \, \xi_{n-j},
        \qquad \xi_m = \sigma(m) z_m,

    with :math:`z_m` i.i.d. standard normal (or Rademacher) per element and
    :math:`n` the pre-increment update count, where optax evaluates
    schedules: update :math:`n` draws :math:`\xi_n` at :math:`\sigma(n)`, so
    ``optax.inject_hyperparams`` gives exactly the updates of a schedule.
    ``init`` draws the pre-history :math:`\xi_{-1}, \ldots, \xi_{1-K}` at
    :math:`\sigma(0)`, so every step has the same law: variance
    :math:`\sigma^2 \sum_j c_j^2` and lag-:math:`k` covariance
    :math:`\sigma^2 \sum_j c_j c_{j+k}` per element. PGD is :math:`c = (1,)`
    (:func:`add_independent_noise`), Anti-PGD :math:`(1, -1)`
    (:func:`add_anticorrelated_noise`); fractional noise is
    :func:`add_fractional_noise`.

    The noise of a leaf is a pure function of ``key``, the step and the
    leaf's path; it is drawn in float32 (float64 for float64 leaves, with a
    float64 :math:`\sigma` and filter), scaled, then cast to the leaf's dtype.
    Int and bool leaves pass through. When a schedule brings :math:`\sigma` to
    0 the draws stop; a filter whose coefficients sum to 0 then takes out all
    the noise it put in within :math:`K - 1` steps, and from then on a step
    does no work on the noise.

    By default the state keeps the :math:`K - 1` past draws, in the params'
    dtypes, in a ring of :math:`K` params-sized slots, slot :math:`m \bmod K`
    holding :math:`\xi_m` (the spare slot takes the new draw, so XLA updates
    the ring in place). ``store_noise=False`` keeps none and
    regenerates them from the key (:math:`K` draws per step, a state of a few
    bytes); the updates are the same to rounding. Either way ``update`` and
    :func:`denoised_params` refuse a tree other than the one ``init`` saw,
    whose past draws the state holds or regenerates; one tap (PGD) has none,
    and draws for any tree.

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
      distribution: ``"gaussian"`` or ``"rademacher"`` (:math:`\pm 1`: the
        same covariance from one random bit per element).
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
      >>> state[1].noise.shape  # 3 slots, slot m mod 3 holding xi_m: xi_0, xi_-2, xi_-1
      (3, 4)
    """
    std_at = _noise_std_fn(noise_std)
    coefficients = _filters.check_coefficients(coefficients)
    num_past = coefficients.shape[0] - 1
    cyclic = _check_choice("leaves", leaves, LEAVES_CODES) == "cyclic"
    distribution = _check_choice("distribution", distribution, DISTRIBUTION_CODES)
    store_noise = _check_bool("store_noise", store_noise)
    impl = _keys.key_impl(key)
    impl_code = IMPL_CODES.get(str(impl), -1)
    sampler = (LAW, impl_code, DISTRIBUTION_CODES[distribution], LEAVES_CODES[leaves])
    if not store_noise and num_past and impl_code < 0:
        raise ValueError(
            "store_noise=False needs a key of a built-in impl (threefry2x32, rbg, "
            f"unsafe_rbg) so that the noise can be regenerated; got impl {impl}."
        )

    def draw(state, steps, tree, scales):
        base_key = jax.random.wrap_key_data(state.key, impl=impl)
        return _draws.tree_noise(base_key, steps, tree, scales, distribution, cyclic)

    def init_fn(params):
        _trees.check_leaves(params)
        dtype = _trees.wide_dtype(params)
        count = jnp.zeros([], jnp.int32)
        std = std_at(count).astype(dtype)
        state = CorrelatedNoiseState(
            count=count,
            key=_keys.key_data(key),
            coefficients=jnp.asarray(coefficients, dtype),
            noise_std=jnp.full([max(num_past, 1)], std),
            noise=(),
            sampler=jnp.asarray(sampler, jnp.int32),
            digest=jnp.asarray(_trees.digest(params)),
        )
        if store_noise and num_past:
            steps = [-lag for lag in range(1, num_past + 1)]
            past = draw(state, steps, params, [std] * num_past)
            state = state._replace(noise=_ring(past, steps, num_past + 1))
        return state

    def update_fn(updates, state, params=None):
        del params
        _check_law(state)
        if num_past:
            positions = _trees.match(_slot(state), state.digest, updates, "updates")
        else:  # one tap has no past draw to match: any tree gets its noise
            positions = list(range(len(_trees.entries(updates)[0])))
        sigma = std_at(state.count).astype(state.noise_std.dtype)
        count, same = state.count, list(range(len(positions)))
        if store_noise and num_past:
            (new,) = draw(state, [count], updates, [sigma])
            ring = _written(state.noise, new, count % (num_past + 1), positions)
            weights = _by_slot(coefficients, count, num_past + 1)
            terms = _slots(ring, num_past + 1), [positions] * (num_past + 1)
            state = state._replace(noise=ring)
        else:  # one tap, or the past draws regenerated from the key
            steps = [count - lag for lag in range(num_past + 1)]
            scales = [sigma, *state.noise_std[:num_past]]
            weights = coefficients
            terms = draw(state, steps, updates, scales), [same, *[positions] * num_past]
        updates = _apply_filter(updates, weights, *terms)
        noise_std = jnp.concatenate([sigma[None], state.noise_std[:-1]])
        return updates, state._replace(
            count=optax.safe_increment(state.count), noise_std=noise_std
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _ring(draws: list[Any], steps: list[int], num_slots: int) -> Any:
    """The stored ring of ``draws`` at ``steps``: slot ``m mod K`` holds ``xi_m``.

    A tree like the draws whose float leaves are ``[K, *shape]`` (the slot no
    draw fills is zero), None and ``MaskedNode`` where they are. ``K - 1``
    draws are in flight; the spare slot is where update ``n`` writes ``xi_n``
    before the filter reads the ring. XLA (on CPU) copies a ring that is read
    before it is updated in place, and so a ring of ``K - 1`` slots (or
    ``K - 1`` trees shifted by one): an 8-tap step on a ResNet-50-sized tree
    took 353 ms that way against 134 ms with the spare slot, and Anti-PGD's
    57 ms against 41 ms on 160 leaves of 250x250 (2-core Intel Xeon).
    """
    slot_of = {step % num_slots: i for i, step in enumerate(steps)}

    def build(*leaves):
        zeros = jnp.zeros_like(leaves[0])
        return jnp.stack(
            [leaves[slot_of[s]] if s in slot_of else zeros for s in range(num_slots)]
        )

    def stack(*leaves):
        if not _trees.carries_noise(leaves[0]):
            return leaves[0]
        sharding = _draws.spread_sharding(leaves[0])
        if isinstance(sharding, NamedSharding):  # eager, over devices: in place
            ring_sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
            return jax.jit(build, out_shardings=ring_sharding)(*leaves)
        return build(*leaves)

    return jax.tree.map(stack, *draws, is_leaf=_trees.is_stub)


def _slots(ring: Any, num_slots: int) -> list[Any]:
    """The slots of a ring, each a tree like the draws."""

    def slot(i):
        return jax.tree.map(
            lambda leaf: leaf[i] if _trees.carries_noise(leaf) else leaf,
            ring,
            is_leaf=_trees.is_stub,
        )

    return [slot(i) for i in range(num_slots)]


def _by_slot(weights: jax.Array, newest: jax.Array, num_slots: int) -> jax.Array:
    """Each slot's weight, where ``weights[j]`` is that of ``xi_{newest - j}``.

    Slot ``i`` holds ``xi_m``, ``m = newest - ((newest - i) mod K)``; a slot
    whose draw is older than ``weights`` reaches gets 0.
    """
    weights = jnp.asarray(weights)
    padded = jnp.zeros([num_slots], weights.dtype).at[: weights.shape[0]].set(weights)
    return padded[(newest - jnp.arange(num_slots)) % num_slots]


def _written(ring: Any, new: Any, slot: jax.Array, positions: list[int]) -> Any:
    """The ring with the new draw in ``slot``, in the ring's dtypes.

    ``positions[i]`` is the ring entry that entry ``i`` of ``new`` is.
    """
    entries, treedef = _trees.entries(ring)
    drawn = [leaf for _, leaf in _trees.entries(new)[0]]
    index_of = {position: i for i, position in enumerate(positions)}
    return treedef.unflatten(
        [
            jax.lax.dynamic_update_index_in_dim(
                leaf, drawn[index_of[j]].astype(leaf.dtype), slot, 0
            )
            if _trees.carries_noise(leaf)
            else leaf
            for j, (_, leaf) in enumerate(entries)
        ]
    )


def _check_law(state: CorrelatedNoiseState) -> None:
    """Refuses a state saved under another noise law, which would run off by a step."""
    if state.sampler.shape[-1:] != (4,):
        raise ValueError(
            "This noise state was saved by optax_antipgd 0.1, whose correlated "
            "noise drew xi_{n+1} at update n; this version draws xi_n, so the "
            "state cannot be continued exactly. Start from opt.init(params) "
            "(the weights can be kept)."
        )


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

    with :math:`z_n` standard normal (or Rademacher), drawn afresh at every
    step, and :math:`n` the pre-increment update count. This is
    :func:`add_correlated_noise` with the one-tap filter :math:`(1,)`; its
    state stores no noise. With no past draw to match, it draws for any
    tree, each leaf's noise a function of its path (a tree other than the
    one ``init`` saw gets the law's noise, not a refusal).

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
    return add_correlated_noise(
        noise_std,
        key,
        coefficients=(1.0,),
        leaves=leaves,
        distribution=distribution,
    )


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

        u_n \leftarrow u_n + \xi_n - c \, \xi_{n-1}, \qquad \xi_m = \sigma(m) z_m,

    with :math:`z_m` i.i.d. standard normal (or Rademacher), :math:`n` the
    pre-increment update count and :math:`c` the ``correlation``. The paper's
    :math:`\xi_{n+1} - \xi_n` is this update's draw minus the previous one.
    ``init`` draws :math:`\xi_{-1}`, so every step has the same law: variance
    :math:`(1 + c^2)\sigma^2` and lag-1 autocorrelation :math:`-c/(1 + c^2)`.
    With :math:`c = 1` (Anti-PGD) the perturbations telescope: after :math:`N`
    steps the weights carry :math:`\xi_{N-1} - \xi_{-1}`, not a random walk,
    and to second order this minimises :math:`L(w) + \frac{\sigma^2}{2}
    \operatorname{Tr} \nabla^2 L(w)`. The noise-free iterate is
    :func:`denoised_params`. :math:`0 < c < 1` is partial anticorrelation (the
    form of DP-:math:`\lambda`-CGD); :math:`c = 0` is independent noise.

    This is :func:`add_correlated_noise` with coefficients :math:`(1, -c)`;
    its state stores the latest draw in a ring of two slots (``xi_m`` in slot
    :math:`m \bmod 2`), or with ``store_noise=False`` regenerates it from the
    key. ``correlation`` may be
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
      store_noise: Whether the state stores the latest draw (faster) or
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
      >>> first = state[1].noise[1]  # xi_{-1}, drawn by init, in slot -1 mod 2
      >>> for _ in range(3):
      ...     updates, state = opt.update(jnp.ones(3), state)
      ...     params = optax.apply_updates(params, updates)
      >>> # The perturbations telescope: params = -3 * 0.1 + xi_2 - xi_{-1}.
      >>> bool(jnp.allclose(params, -0.3 + state[1].noise[0] - first))
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

        u_n \leftarrow u_n + \sum_{j=0}^{K-1} c_j \, \xi_{n-j},
        \qquad c = \texttt{fractional\_coefficients}(H, K),

    the first :math:`K` coefficients of the moving-average representation of
    fractional Gaussian noise with Hurst exponent :math:`H`, normalised to
    unit norm: the perturbations approximate fGn of scale :math:`\sigma`,
    :math:`\operatorname{Cov}(p_n, p_{n+k}) \approx \frac{\sigma^2}{2}
    (|k+1|^{2H} - 2|k|^{2H} + |k-1|^{2H})` (the accuracy of the truncation is
    tabled in :func:`fractional_coefficients`). :math:`H = 1/2` is PGD's law,
    :math:`H < 1/2` anticorrelated (:math:`H \to 0`: Anti-PGD's), :math:`H >
    1/2` positively correlated. This is :func:`add_correlated_noise` with
    those coefficients, and keeps :math:`K - 1` past draws in a ring of
    :math:`K` slots (or regenerates them with ``store_noise=False``).

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
      >>> state[1].noise.shape  # a ring of 8 slots: xi_0 and the 7 before it
      (8, 3)

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

    Anti-PGD's weights are :math:`w_n = v_n + \xi_{n-1}`, where :math:`v_n`
    follows plain gradient descent evaluated at the perturbed weights,
    :math:`v_{n+1} = v_n - \eta \nabla L(w_n)`; this returns :math:`v_n`.
    Evaluate a model on it to see where the optimizer is heading without the
    noise. For a filter :math:`c` of :math:`K` coefficients it subtracts
    :math:`\sum_{j=0}^{K-2} D_j \xi_{n-1-j}`, :math:`D_j = c_0 + \ldots +
    c_j`: the noise the filter has put into the weights and will take out
    again. When the coefficients sum to 0 (Anti-PGD, any :math:`(1, -1)`-like
    filter) that is all the noise, and :math:`v_{n+1} = v_n - \eta \nabla
    L(w_n)` holds exactly. When they sum to :math:`s \neq 0` (partial
    anticorrelation, fractional noise) the weights also carry :math:`s` times
    the random walk of the draws that left the filter, which no state
    records: the result is then the weights without the noise in flight, not
    a noise-free iterate. PGD (one tap) has nothing in flight: its params are
    returned as they are.

    ``opt_state`` may be any optax state that contains the state of a noise
    transform (inside ``optax.chain``, ``optax.masked``,
    ``optax.inject_hyperparams``, ...); if it contains several, the noise of
    each is removed. ``params`` must be the tree ``init`` saw (the same paths,
    shapes and, with stored noise, dtypes): anything else is refused, also
    under ``jax.jit`` (but by PGD, which has nothing to subtract). A
    ``store_noise=False`` state regenerates the noise from the key; such a
    state records no mask, so inside ``optax.masked`` (or
    ``optax.partition``) it is refused.

    Args:
      opt_state: An optimizer state containing a
        :class:`CorrelatedNoiseState`.
      params: The current parameters :math:`w_n`, the tree given to ``init``.

    Returns:
      :math:`v_n`, with the structure and dtypes of ``params``.

    Raises:
      ValueError: If ``opt_state`` holds no noise state, if ``params`` is not
        the tree the state was built for, or for a ``store_noise=False`` state
        inside ``optax.masked``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_antipgd as ap
      >>> opt = ap.anti_pgd(learning_rate=0.1, noise_std=0.5, key=0)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = opt.init(params)
      >>> # init drew xi_{-1}: the noise-free iterate starts at w_0 - xi_{-1}.
      >>> clean = ap.denoised_params(state, params)
      >>> bool(jnp.all(clean["w"] == -state[1].noise["w"][1]))  # slot -1 mod 2
      True
    """
    states = _noise_states(opt_state)
    if not states:
        raise ValueError(
            "opt_state holds no CorrelatedNoiseState: denoised_params needs the "
            "state of a noise transform of optax_antipgd (add_*_noise, pgd, "
            "anti_pgd, fractional_pgd)."
        )
    masked = {
        id(state)
        for _, masked_state in optax.tree_utils.tree_get_all_with_path(
            opt_state, optax.MaskedState.__name__
        )
        for state in _noise_states(masked_state)
    }
    for state in states:
        params = _denoised(state, params, masked=id(state) in masked)
    return params


def _denoised(state: CorrelatedNoiseState, params: Any, masked: bool) -> Any:
    _check_law(state)
    num_past = state.coefficients.shape[-1] - 1
    reference = _slot(state)
    if num_past and reference is None and masked:
        raise ValueError(
            "denoised_params cannot tell which leaves optax.masked excluded from "
            "the noise of a store_noise=False state; use store_noise=True."
        )
    if not num_past:
        return params  # one tap: nothing in flight, whatever the tree
    positions = _trees.match(reference, state.digest, params, "params", dtypes=True)
    in_flight = jnp.cumsum(state.coefficients)[:num_past]  # of xi_{n-1}, ...
    if reference is None:
        steps = [state.count - lag for lag in range(1, num_past + 1)]
        past = _regenerated(state, steps, params)
    else:
        in_flight = _by_slot(in_flight, state.count - 1, num_past + 1)
        past = _slots(state.noise, num_past + 1)
    return _apply_filter(params, -in_flight, past, [positions] * len(past))


def _slot(state: CorrelatedNoiseState) -> Any | None:
    """One slot of the stored ring, as shapes: init's tree; None if none is stored."""
    if isinstance(state.noise, tuple) and not state.noise:
        return None
    return jax.tree.map(
        lambda leaf: (
            jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
            if _trees.carries_noise(leaf)
            else leaf
        ),
        state.noise,
        is_leaf=_trees.is_stub,
    )


def _regenerated(state: CorrelatedNoiseState, steps: list[Any], tree: Any) -> list[Any]:
    """The draws at ``steps`` of a ``store_noise=False`` state, in ``tree``'s dtypes.

    The key impl, distribution and leaves are read from the state's codes.
    Under ``jax.jit`` (traced codes) each (impl, distribution) whose key has
    the state's key shape is compiled, and ``lax.switch`` picks one; the
    leaves code is applied as data (cyclic leaves zero the rows of the
    leaves that did not draw), so it costs no branch.
    """
    scales = [state.noise_std[s] for s in range(len(steps))]
    impls = {code: impl for impl, code in IMPL_CODES.items()}
    distributions = {code: d for d, code in DISTRIBUTION_CODES.items()}

    def draw(impl_code, distribution_code, cyclic):
        key = jax.random.wrap_key_data(state.key, impl=impls[impl_code])
        return _draws.tree_noise(
            key, steps, tree, scales, distributions[distribution_code], cyclic
        )

    _, impl_code, distribution_code, leaves_code = state.sampler
    if not isinstance(state.sampler, jax.core.Tracer):
        return draw(int(impl_code), int(distribution_code), int(leaves_code) == 1)
    combinations = [
        (impl_c, distribution_c)
        for impl, impl_c in IMPL_CODES.items()
        if _keys.key_shape(impl) == state.key.shape
        for distribution_c in DISTRIBUTION_CODES.values()
    ]
    branch = jnp.argmax(
        jnp.stack(
            [(impl_code == i) & (distribution_code == d) for i, d in combinations]
        )
    )
    drawn = jax.lax.switch(
        branch, [lambda c=c: draw(*c, cyclic=False) for c in combinations]
    )
    return [
        _draws.keep_active(noise, step, leaves_code == 1)
        for noise, step in zip(drawn, steps, strict=True)
    ]
