"""Keys and per-leaf streams: every accepted key, every rejected one."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_antipgd as ap

PARAMS = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}


def first_updates(key, **kwargs):
    transform = ap.add_anticorrelated_noise(0.5, key, **kwargs)
    return transform.update(PARAMS, transform.init(PARAMS))[0]


@pytest.mark.parametrize(
    "key",
    [
        0,
        np.int64(0),
        jnp.asarray(0),
        jnp.asarray(0, jnp.uint32),
        jax.random.PRNGKey(0),
        jax.random.key(0),
    ],
    ids=["int", "numpy-int", "int-array", "uint32-scalar", "PRNGKey", "typed"],
)
def test_every_form_of_the_same_seed_gives_the_same_noise(key):
    chex.assert_trees_all_equal(first_updates(key), first_updates(0))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_typed_keys_of_any_impl_are_accepted_and_stored_as_raw_data(impl):
    key = jax.random.key(3, impl=impl)
    transform = ap.add_anticorrelated_noise(0.5, key)
    state = transform.init(PARAMS)
    assert state.key.dtype == jnp.uint32
    np.testing.assert_array_equal(state.key, jax.random.key_data(key))
    updates, _ = transform.update(PARAMS, state)
    assert np.all(np.isfinite(updates["w"])) and np.any(updates["w"] != 0)


def test_different_impls_give_different_streams():
    threefry = first_updates(jax.random.key(3, impl="threefry2x32"))
    rbg = first_updates(jax.random.key(3, impl="rbg"))
    assert not np.array_equal(threefry["w"], rbg["w"])


def test_the_optimizer_can_be_built_inside_vmap_over_seeds():
    def run(seed):
        return first_updates(seed)["w"]

    batched = jax.jit(jax.vmap(run))(jnp.arange(3))
    for seed in range(3):
        np.testing.assert_allclose(batched[seed], run(seed), atol=1e-6)
    assert not np.array_equal(batched[0], batched[1])


@pytest.mark.parametrize(
    "key", [jax.random.PRNGKey(5), jax.random.key(5), jnp.asarray(5)]
)
def test_the_key_may_be_a_tracer_under_jit(key):
    traced = jax.jit(first_updates)(key)
    chex.assert_trees_all_close(traced, first_updates(key), atol=1e-6)


def test_the_key_may_be_an_inject_hyperparams_argument():
    opt = optax.inject_hyperparams(ap.anti_pgd)(learning_rate=0.1, noise_std=0.5, key=4)
    state = opt.init(PARAMS)
    assert state.hyperparams["key"].dtype == jnp.int32
    updates, _ = jax.jit(opt.update)(PARAMS, state, PARAMS)
    expected, _ = ap.anti_pgd(0.1, 0.5, 4).update(
        PARAMS, ap.anti_pgd(0.1, 0.5, 4).init(PARAMS), PARAMS
    )
    chex.assert_trees_all_close(updates, expected, atol=1e-6)


@pytest.mark.parametrize(
    "key",
    [
        1.5,
        "seed",
        None,
        True,
        jnp.zeros(3, jnp.uint32),
        jnp.zeros(2, jnp.int32),
        jnp.zeros(2, jnp.float32),
        jax.random.split(jax.random.key(0), 2),
    ],
    ids=[
        "float",
        "string",
        "None",
        "bool",
        "uint32[3]",
        "int32[2]",
        "float32[2]",
        "two-typed-keys",
    ],
)
@pytest.mark.parametrize(
    "factory",
    [
        ap.add_independent_noise,
        ap.add_anticorrelated_noise,
        lambda std, key: ap.pgd(0.1, std, key),
        lambda std, key: ap.anti_pgd(0.1, std, key),
    ],
    ids=["independent", "anticorrelated", "pgd", "anti_pgd"],
)
def test_keys_of_the_wrong_type_or_shape_are_rejected_at_construction(factory, key):
    with pytest.raises(TypeError, match="key"):
        factory(0.1, key)


def test_noise_is_the_same_in_another_process():
    # No salted hash and no process-dependent state: a fresh interpreter (with
    # a different PYTHONHASHSEED) draws bit-identical noise.
    script = (
        "import jax.numpy as jnp, numpy as np, optax_antipgd as ap;"
        "p = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)};"
        "t = ap.add_anticorrelated_noise(0.5, 0);"
        "u = t.update(p, t.init(p))[0];"
        "print(np.asarray(u['w']).tobytes().hex())"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
        timeout=300,
    ).stdout.strip()
    assert out == np.asarray(first_updates(0)["w"]).tobytes().hex()
