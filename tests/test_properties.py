"""Property tests over random pytrees, long runs, and strict dtype promotion."""

import dataclasses
import functools
from typing import Any

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_antipgd as ap
from tests._law import assert_equal_up_to_rounding
from tests._law import past_draws

# Each example builds a new tree, hence new traces: keep the count modest.
# Derandomized, so that CI runs the same examples every time.
PROPERTY_SETTINGS = hypothesis.settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
OTHER_DTYPES = (jnp.int32, jnp.int8, jnp.uint8, jnp.bool_)
SHAPES = ((), (0,), (3,), (2, 0), (2, 3), (1, 1, 4))


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["first", "second"], meta_fields=[]
)
@dataclasses.dataclass
class Pair:
    """A custom dataclass pytree node."""

    first: Any
    second: Any


def make_leaf(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if jnp.issubdtype(dtype, jnp.floating):
        values = rng.normal(size=shape)
    elif dtype == jnp.bool_:
        values = rng.random(size=shape) < 0.5
    else:
        values = rng.integers(0, 100, size=shape)
    return jnp.asarray(values, dtype)


leaves = st.one_of(
    st.none(),
    st.builds(
        make_leaf,
        st.sampled_from(SHAPES),
        st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES),
        st.integers(0, 2**16),
    ),
)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from("abcd"), children, max_size=3),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.builds(Pair, children, children),
    ),
    max_leaves=8,
)

# Distinct coefficients that sum to 0: a slot read at the wrong lag changes
# the numbers, and a schedule that reaches 0 cancels the noise in K - 1 steps.
THREE_TAPS = (1.0, -0.6, -0.4)
HURST = 0.25

NOISE = {
    "independent": lambda std, key, dist: ap.add_independent_noise(
        std, key, distribution=dist
    ),
    "independent_cyclic": lambda std, key, dist: ap.add_independent_noise(
        std, key, distribution=dist, leaves="cyclic"
    ),
    "anticorrelated_stored": lambda std, key, dist: ap.add_anticorrelated_noise(
        std, key, distribution=dist
    ),
    "anticorrelated_regenerated": lambda std, key, dist: ap.add_anticorrelated_noise(
        std, key, distribution=dist, store_noise=False
    ),
    "anticorrelated_cyclic": lambda std, key, dist: ap.add_anticorrelated_noise(
        std, key, distribution=dist, leaves="cyclic"
    ),
    "correlated_3tap": lambda std, key, dist: ap.add_correlated_noise(
        std, key, coefficients=THREE_TAPS, distribution=dist
    ),
    "fractional_stored": lambda std, key, dist: ap.add_fractional_noise(
        std, key, hurst=HURST, distribution=dist
    ),
    "fractional_regenerated": lambda std, key, dist: ap.add_fractional_noise(
        std, key, hurst=HURST, distribution=dist, store_noise=False
    ),
}
# The K - 1 past draws the state of each stored kind keeps (in a ring); the
# other correlated kinds keep none.
STORED_PAST = {
    "anticorrelated_stored": 1,
    "anticorrelated_cyclic": 1,
    "correlated_3tap": 2,
    "fractional_stored": 7,
}


def num_stored(num_past, tree):
    """The past draws a stored state shows: K - 1, but none for the empty
    tree, whose ring is () like that of a state that stores none."""
    return 0 if isinstance(tree, tuple) and not tree else num_past


CORRELATED = {
    "anticorrelated_stored",
    "anticorrelated_regenerated",
    "anticorrelated_cyclic",
    "correlated_3tap",
    "fractional_stored",
    "fractional_regenerated",
}
noise_kinds = st.sampled_from(sorted(NOISE))
distributions = st.sampled_from(["gaussian", "rademacher"])


def is_float(leaf):
    return leaf is not None and jnp.issubdtype(leaf.dtype, jnp.floating)


def num_noised_elements(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree) if is_float(leaf))


def float_leaves(tree):
    return [leaf for leaf in jax.tree.leaves(tree) if is_float(leaf)]


def num_drawn_elements(tree, kind, num_steps=2):
    """Elements whose noise ``run_updates`` draws: all, or the cyclic few.

    Cyclic leaves: update ``n`` draws float leaf ``n mod L`` (independent
    noise), or leaf ``(n + 1) mod L`` after init drew leaf 0 (anticorrelated).
    """
    leaves = float_leaves(tree)
    if not kind.endswith("cyclic") or not leaves:
        return num_noised_elements(tree)
    steps = range(num_steps) if kind == "independent_cyclic" else range(num_steps + 1)
    return sum(leaves[index].size for index in {n % len(leaves) for n in steps})


def run_updates(transform, tree, num_steps=2):
    """The updates of ``num_steps`` calls on ``tree``, and the last state."""
    state = transform.init(tree)
    all_updates = []
    for _ in range(num_steps):
        updates, state = transform.update(tree, state)
        all_updates.append(updates)
    return all_updates, state


def assert_same_structure_shapes_dtypes(actual, expected):
    is_none = lambda x: x is None  # noqa: E731
    assert jax.tree.structure(actual, is_leaf=is_none) == jax.tree.structure(
        expected, is_leaf=is_none
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)


@PROPERTY_SETTINGS
@hypothesis.given(tree=trees, kind=noise_kinds, distribution=distributions)
def test_updates_keep_structure_shapes_and_dtypes(tree, kind, distribution):
    transform = NOISE[kind](0.5, 0, distribution)
    state = transform.init(tree)
    (first, second), last_state = run_updates(transform, tree)
    assert_same_structure_shapes_dtypes(first, tree)
    assert_same_structure_shapes_dtypes(second, tree)
    # The state keeps its structure, shapes and dtypes: lax.scan can carry it.
    assert_same_structure_shapes_dtypes(last_state, state)
    if kind in CORRELATED:
        # K - 1 past draws like the float leaves of the params, or none.
        past = past_draws(last_state)
        assert len(past) == num_stored(STORED_PAST.get(kind, 0), tree)
        expected_noise = jax.tree.map(lambda x: x if is_float(x) else None, tree)
        for noise in past:
            assert_same_structure_shapes_dtypes(noise, expected_noise)


@PROPERTY_SETTINGS
@hypothesis.given(tree=trees, kind=noise_kinds, distribution=distributions)
def test_int_bool_and_none_leaves_pass_through_untouched(tree, kind, distribution):
    transform = NOISE[kind](1.0, 0, distribution)
    for updates in run_updates(transform, tree)[0]:
        for leaf, update in zip(
            jax.tree.leaves(tree), jax.tree.leaves(updates), strict=True
        ):
            if not is_float(leaf):
                assert update.dtype == leaf.dtype
                np.testing.assert_array_equal(update, leaf)
    # None leaves: the structure with None as a leaf is unchanged.
    assert_same_structure_shapes_dtypes(updates, tree)


@PROPERTY_SETTINGS
@hypothesis.given(tree=trees, kind=noise_kinds, distribution=distributions)
def test_zero_noise_is_the_identity(tree, kind, distribution):
    transform = NOISE[kind](0.0, 0, distribution)
    all_updates, state = run_updates(transform, tree)
    for updates in all_updates:
        chex.assert_trees_all_equal(updates, tree)
        chex.assert_trees_all_equal_dtypes(updates, tree)
    if kind in STORED_PAST:
        assert len(past_draws(state)) == num_stored(STORED_PAST[kind], tree)
        for noise in jax.tree.leaves(state.noise):  # every slot of the ring
            np.testing.assert_array_equal(noise, np.zeros_like(noise))


@PROPERTY_SETTINGS
@hypothesis.given(
    tree=trees,
    kind=noise_kinds,
    distribution=distributions,
    seed=st.integers(0, 2**31 - 1),
)
def test_same_key_gives_the_same_updates(tree, kind, distribution, seed):
    # An int seed, a raw key and a typed key of the same seed are the same key.
    same_keys = (seed, jax.random.PRNGKey(seed), jax.random.key(seed))
    runs = [run_updates(NOISE[kind](1.0, key, distribution), tree) for key in same_keys]
    for other in runs[1:]:
        chex.assert_trees_all_equal(other, runs[0])
    # A different key gives different noise (given enough elements that a
    # coincidence is out of the question: at most 3/8 per element). Cyclic
    # kinds draw on a few leaves only: count the elements of those.
    if num_drawn_elements(tree, kind) >= 32:
        other_key = run_updates(NOISE[kind](1.0, seed + 1, distribution), tree)[0]
        a, b = jax.tree.leaves(runs[0][0]), jax.tree.leaves(other_key)
        assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# The filters of the family with a ring to keep (K > 1), by coefficients. The
# fractional filter with 4 taps: a ring of 4 slots wraps like the default ring
# of 8 in half the eager steps (each example runs K + 1 of them, in both modes).
FILTERS = {
    "anticorrelated": (1.0, -1.0),
    "partially_anticorrelated": (1.0, -0.5),
    "correlated_3tap": THREE_TAPS,
    "fractional": tuple(ap.fractional_coefficients(HURST, 4)),
}


@PROPERTY_SETTINGS
@hypothesis.given(
    tree=trees,
    filter_name=st.sampled_from(sorted(FILTERS)),
    leaves=st.sampled_from(["all", "cyclic"]),
    distribution=distributions,
    schedule=st.booleans(),
)
def test_store_modes_agree(tree, filter_name, leaves, distribution, schedule):
    # A schedule that reaches 0 at the second update covers the cancellation.
    noise_std = optax.linear_schedule(1.0, 0.0, 2) if schedule else 0.7
    coefficients = FILTERS[filter_name]
    # K + 1 updates: the ring wraps around, every slot is overwritten.
    num_steps = len(coefficients) + 1

    def make(store_noise):
        return ap.add_correlated_noise(
            noise_std,
            1,
            coefficients=coefficients,
            leaves=leaves,
            distribution=distribution,
            store_noise=store_noise,
        )

    stored, stored_state = run_updates(make(True), tree, num_steps)
    regenerated, regenerated_state = run_updates(make(False), tree, num_steps)
    assert len(past_draws(stored_state)) == num_stored(len(coefficients) - 1, tree)
    assert regenerated_state.noise == ()
    # The same draws with the same weights, in the params' dtypes; the stored
    # ring sums them in slot order, the regenerated draws in lag order, so the
    # last bit may differ (exactly equal for two taps, where the orders agree).
    assert_equal_up_to_rounding(regenerated, stored)
    chex.assert_trees_all_equal_dtypes(regenerated, stored)
    # ... and so is the noise-free iterate, subtracted from the stored ring or
    # from the draws regenerated from the key.
    assert_equal_up_to_rounding(
        ap.denoised_params(regenerated_state, tree),
        ap.denoised_params(stored_state, tree),
    )
    if len(coefficients) <= 2:
        chex.assert_trees_all_equal(regenerated, stored)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@PROPERTY_SETTINGS
@hypothesis.given(tree=trees, anticorrelated=st.booleans())
# Two leaves of one shape and dtype, drawn by one loop on CPU: the leaf that
# does not draw once got +sigma with Rademacher noise (zero words unpacked to
# +1 signs), fixed in ee27095.
@hypothesis.example(
    tree={"a": np.float32(0.5), "b": {"a": np.float32(-1.0)}}, anticorrelated=False
)
def test_cyclic_leaves_draw_one_float_leaf_per_step_in_tree_order(
    tree, anticorrelated, distribution
):
    # Updates of zeros: update n is the perturbation itself, exactly. Float
    # leaf n mod L draws at step n (tree order, so each leaf once per cycle of
    # L steps) and the others get exactly 0; with Anti-PGD the perturbation
    # xi_n - xi_{n-1} touches at most leaves n and n - 1 (mod L), and the
    # state holds xi_n, nonzero on leaf n only.
    zeros = jax.tree.map(lambda x: jnp.zeros_like(x) if is_float(x) else x, tree)
    num_leaves = len(float_leaves(tree))
    # An empty leaf draws when its turn comes but cannot show it.
    shown = {i for i, leaf in enumerate(float_leaves(tree)) if leaf.size}
    if anticorrelated:
        transform = ap.add_anticorrelated_noise(
            1.0, 3, distribution=distribution, leaves="cyclic"
        )
    else:
        transform = ap.add_independent_noise(
            1.0, 3, distribution=distribution, leaves="cyclic"
        )
    update = jax.jit(transform.update)
    state = transform.init(zeros)
    if anticorrelated:
        assert drawn_leaves(past_draws(state)[0]) == {num_leaves - 1} & shown
    for n in range(num_leaves + 2):
        updates, state = update(zeros, state)
        for index, (leaf, update_leaf) in enumerate(
            zip(jax.tree.leaves(zeros), jax.tree.leaves(updates), strict=True)
        ):
            if not is_float(leaf):
                np.testing.assert_array_equal(update_leaf, leaf)
                assert update_leaf.dtype == leaf.dtype, index
        if not num_leaves:
            continue
        active = n % num_leaves
        if not anticorrelated:
            assert drawn_leaves(updates) == {active} & shown, n
            continue
        previous = (n - 1) % num_leaves
        assert drawn_leaves(past_draws(state)[0]) == {active} & shown, n
        # With one leaf both draws land on it and may cancel elementwise.
        if num_leaves > 1:
            assert drawn_leaves(updates) == {active, previous} & shown, n
    assert int(state.count) == num_leaves + 2


def drawn_leaves(tree):
    """Indices (among float leaves) of the leaves that are nonzero everywhere.

    Asserts that every other float leaf is exactly zero: no leaf may be
    nonzero in part only (a normal draw is 0 with probability 0, also once
    cast to float16; a Rademacher draw never). Empty leaves are never listed.
    """
    drawn = set()
    for index, leaf in enumerate(float_leaves(tree)):
        values = np.asarray(leaf, np.float32)
        if values.size and np.all(values != 0):
            drawn.add(index)
        else:
            np.testing.assert_array_equal(values, 0, err_msg=f"leaf {index}")
    return drawn


LONG_RUN_STEPS = 100_000


# The 7 stored draws once: their shifts do not depend on the distribution.
@pytest.mark.parametrize(
    ("kind", "distribution"),
    [
        *(
            (kind, distribution)
            for kind in ("independent", "anticorrelated_stored")
            for distribution in ("gaussian", "rademacher")
        ),
        ("fractional_stored", "gaussian"),
    ],
)
def test_100k_steps_under_scan_keep_the_noise_statistics(kind, distribution):
    # z_n of a 64-element leaf for n = 0 .. 100k: every draw must be fresh
    # (no stream reuse as the counter grows), standardised and uncorrelated
    # with the draws before it, near and far. Stored kinds: update n writes
    # xi_n into slot n mod R of the ring and leaves the other slots as they
    # were.
    #
    # A real scan of 100k steps, not one update vmapped over states built at
    # chosen counts: the scan takes 1 to 2 s a case on CPU (about 10 us a
    # step), and the vmapped version, measured, was no faster (1.5 to 5 s a
    # case: compiling dominates both), while it checks less (states built,
    # not carried).
    noise_std = 0.5
    transform = NOISE[kind](noise_std, 7, distribution)
    leaf = jnp.zeros(64)
    stored = kind in STORED_PAST

    def step(state, _):
        updates, new_state = transform.update(leaf, state)
        if not stored:
            return new_state, (updates, True)
        ring, old = new_state.noise, state.noise
        slot = state.count % ring.shape[0]
        written = (jnp.arange(ring.shape[0]) == slot)[:, None]
        others_kept = jnp.all(written | (ring == old))
        return new_state, (ring[slot], others_kept)

    state, (draws, others_kept) = jax.jit(
        lambda: jax.lax.scan(step, transform.init(leaf), length=LONG_RUN_STEPS)
    )()
    assert int(state.count) == LONG_RUN_STEPS
    assert bool(jnp.all(others_kept))
    z = np.asarray(draws, np.float64) / noise_std  # row n: z_n
    assert z.shape == (LONG_RUN_STEPS, 64)

    # No two steps drew the same vector, as a reused stream would (a chance
    # coincidence among 100k rows of 64 signs has probability 3e-10).
    assert len(np.unique(z, axis=0)) == LONG_RUN_STEPS

    # Mean 0 and second moment 1; 5 sigma bounds for 6.4M samples (z^2 has
    # variance 2 for a Gaussian, 0 for Rademacher).
    num = z.size
    assert abs(z.mean()) < 5 / np.sqrt(num)
    fourth_moment = 3.0 if distribution == "gaussian" else 1.0
    assert abs(np.mean(z**2) - 1) <= 5 * np.sqrt((fourth_moment - 1) / num)
    if distribution == "rademacher":
        np.testing.assert_array_equal(np.abs(z), 1.0)

    # Correlation of z_n with z_{n+lag}, near and far; 5 sigma each.
    for lag in (1, 2, 1_000, 2**15, 2**16, LONG_RUN_STEPS - 1):
        pairs = z[:-lag] * z[lag:]
        assert abs(pairs.mean()) < 5 / np.sqrt(pairs.size), lag


STRICT_TREE = {
    "f32": jnp.linspace(-1, 1, 6, dtype=jnp.float32).reshape(2, 3),
    "bf16": jnp.ones(4, jnp.bfloat16),
    "f16": jnp.full([], 0.5, jnp.float16),
    "empty": jnp.zeros((0, 2)),
    "int": jnp.arange(3, dtype=jnp.int32),
    "bool": jnp.array([True, False]),
    "none": None,
}

# The Rademacher draw does not depend on the filter: the three original kinds
# cover it. Rings of K - 1 > 1 slots: the 3-tap filter, stored, and the 3-tap
# schedule below, regenerated; the 8-tap fractional filter is compiled in the
# fractional_pgd alias test (its eager steps cost seconds each).
STRICT_TRANSFORMS = {
    **{
        f"{kind}_{distribution}": functools.partial(
            NOISE[kind], 0.5, jax.random.key(0), distribution
        )
        for kind in NOISE
        for distribution in ("gaussian", "rademacher")
        if kind
        in ("independent", "anticorrelated_stored", "anticorrelated_regenerated")
        or (distribution == "gaussian" and not kind.startswith("fractional"))
    },
    "anticorrelated_schedule": lambda: ap.add_anticorrelated_noise(
        optax.exponential_decay(0.5, 1, 0.5), 0
    ),
    "correlated_schedule_regenerated": lambda: ap.add_correlated_noise(
        optax.exponential_decay(0.5, 1, 0.5),
        0,
        coefficients=THREE_TAPS,
        store_noise=False,
    ),
    "inject_hyperparams": lambda: optax.inject_hyperparams(ap.add_anticorrelated_noise)(
        noise_std=0.5, key=0, store_noise=False
    ),
    # The correlation arrives as a traced float32 array.
    "inject_hyperparams_correlation": lambda: optax.inject_hyperparams(
        ap.add_anticorrelated_noise
    )(noise_std=0.5, key=0, correlation=0.5),
}
# Those whose state holds a CorrelatedNoiseState: denoised_params applies.
STRICT_DENOISED = {
    name
    for name in STRICT_TRANSFORMS
    if name.startswith(("anticorrelated", "correlated", "fractional", "inject"))
}
# optax.inject_hyperparams itself promotes the dtypes of all the leaves in
# init (optax.tree_utils.tree_dtype), which strict promotion refuses for a
# tree that mixes float widths, ints and bools: give it one float dtype.
ONE_FLOAT_DTYPE_TREE = {
    "f32": STRICT_TREE["f32"],
    "scalar": jnp.float32(2),
    "empty": STRICT_TREE["empty"],
    "none": None,
}
STRICT_TREES = {
    "inject_hyperparams": ONE_FLOAT_DTYPE_TREE,
    "inject_hyperparams_correlation": ONE_FLOAT_DTYPE_TREE,
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", STRICT_TRANSFORMS)
def test_transforms_work_under_strict_promotion(name, jit):
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        transform = STRICT_TRANSFORMS[name]()
        init, update = transform.init, transform.update
        if jit:
            init, update = jax.jit(init), jax.jit(update)
        tree = STRICT_TREES.get(name, STRICT_TREE)
        state = init(tree)
        for _ in range(2):
            updates, state = update(tree, state)
        assert_same_structure_shapes_dtypes(updates, tree)
        if name in STRICT_DENOISED:
            denoised = ap.denoised_params(state, tree)
            assert_same_structure_shapes_dtypes(denoised, tree)


STRICT_ALIASES = {
    "pgd": lambda: ap.pgd(0.1, 0.01, 0, momentum=0.9),
    "anti_pgd": lambda: ap.anti_pgd(0.1, 0.01, 0, momentum=0.9),
    "fractional_pgd": lambda: ap.fractional_pgd(
        0.1, 0.01, 0, hurst=HURST, momentum=0.9
    ),
}


@pytest.mark.parametrize("alias", STRICT_ALIASES)
def test_aliases_work_under_strict_promotion(alias):
    params = {"f32": STRICT_TREE["f32"], "bf16": STRICT_TREE["bf16"]}
    opt = STRICT_ALIASES[alias]()

    def loss(params):
        return jnp.sum(params["f32"] ** 2) + jnp.sum(params["bf16"] ** 2).astype(
            jnp.float32
        )

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        state = opt.init(params)
        new_params = params
        for _ in range(2):
            new_params, state = step(new_params, state)
    assert_same_structure_shapes_dtypes(new_params, params)
    assert not np.array_equal(new_params["f32"], params["f32"])
