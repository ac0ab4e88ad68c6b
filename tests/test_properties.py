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

NOISE = {
    "independent": lambda std, key, dist: ap.add_independent_noise(
        std, key, distribution=dist
    ),
    "anticorrelated_stored": lambda std, key, dist: ap.add_anticorrelated_noise(
        std, key, distribution=dist
    ),
    "anticorrelated_regenerated": lambda std, key, dist: ap.add_anticorrelated_noise(
        std, key, distribution=dist, store_noise=False
    ),
}
noise_kinds = st.sampled_from(sorted(NOISE))
distributions = st.sampled_from(["gaussian", "rademacher"])


def is_float(leaf):
    return leaf is not None and jnp.issubdtype(leaf.dtype, jnp.floating)


def num_noised_elements(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree) if is_float(leaf))


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
    if kind == "anticorrelated_stored":
        expected_noise = jax.tree.map(lambda x: x if is_float(x) else None, tree)
        assert_same_structure_shapes_dtypes(last_state.noise, expected_noise)


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
    if kind == "anticorrelated_stored":
        for noise in jax.tree.leaves(state.noise):
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
    # coincidence is out of the question: at most 3/8 per element).
    if num_noised_elements(tree) >= 32:
        other_key = run_updates(NOISE[kind](1.0, seed + 1, distribution), tree)[0]
        a, b = jax.tree.leaves(runs[0][0]), jax.tree.leaves(other_key)
        assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@PROPERTY_SETTINGS
@hypothesis.given(
    tree=trees,
    distribution=distributions,
    schedule=st.booleans(),
)
def test_store_modes_agree(tree, distribution, schedule):
    # A schedule that reaches 0 at the second update covers the cancellation.
    noise_std = optax.linear_schedule(1.0, 0.0, 2) if schedule else 0.7
    stored, _ = run_updates(
        ap.add_anticorrelated_noise(noise_std, 1, distribution=distribution),
        tree,
        num_steps=3,
    )
    regenerated, _ = run_updates(
        ap.add_anticorrelated_noise(
            noise_std, 1, distribution=distribution, store_noise=False
        ),
        tree,
        num_steps=3,
    )
    # Both compute the same expressions from the same draws: exactly equal.
    chex.assert_trees_all_equal(regenerated, stored)
    chex.assert_trees_all_equal_dtypes(regenerated, stored)


LONG_RUN_STEPS = 100_000


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("kind", ["independent", "anticorrelated_stored"])
def test_100k_steps_under_scan_keep_the_noise_statistics(kind, distribution):
    # z_n of a 64-element leaf for n = 0 .. 100k: every draw must be fresh
    # (no stream reuse as the counter grows), standardised and uncorrelated
    # with the draws before it, near and far.
    noise_std = 0.5
    transform = NOISE[kind](noise_std, 7, distribution)
    leaf = jnp.zeros(64)

    def step(state, _):
        updates, state = transform.update(leaf, state)
        return state, state.noise if kind == "anticorrelated_stored" else updates

    state, draws = jax.jit(
        lambda: jax.lax.scan(step, transform.init(leaf), length=LONG_RUN_STEPS)
    )()
    assert int(state.count) == LONG_RUN_STEPS
    z = np.asarray(draws, np.float64) / noise_std  # row n: z_n (or z_{n+1})
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

STRICT_TRANSFORMS = {
    **{
        f"{kind}_{distribution}": functools.partial(
            NOISE[kind], 0.5, jax.random.key(0), distribution
        )
        for kind in NOISE
        for distribution in ("gaussian", "rademacher")
    },
    "anticorrelated_schedule": lambda: ap.add_anticorrelated_noise(
        optax.exponential_decay(0.5, 1, 0.5), 0
    ),
    "inject_hyperparams": lambda: optax.inject_hyperparams(ap.add_anticorrelated_noise)(
        noise_std=0.5, key=0, store_noise=False
    ),
}
# optax.inject_hyperparams itself promotes the dtypes of all the leaves in
# init (optax.tree_utils.tree_dtype), which strict promotion refuses for a
# tree that mixes float widths, ints and bools: give it one float dtype.
STRICT_TREES = {
    "inject_hyperparams": {
        "f32": STRICT_TREE["f32"],
        "scalar": jnp.float32(2),
        "empty": STRICT_TREE["empty"],
        "none": None,
    }
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
        if name.startswith("anticorrelated") or name == "inject_hyperparams":
            denoised = ap.denoised_params(state, tree)
            assert_same_structure_shapes_dtypes(denoised, tree)


@pytest.mark.parametrize("alias", ["pgd", "anti_pgd"])
def test_aliases_work_under_strict_promotion(alias):
    params = {"f32": STRICT_TREE["f32"], "bf16": STRICT_TREE["bf16"]}
    opt = getattr(ap, alias)(0.1, 0.01, 0, momentum=0.9)

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
