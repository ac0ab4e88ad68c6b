"""The aliases are their chains; the two places the noise can go."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_antipgd as ap

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.ones(3)}


def loss(params):
    return jnp.sum(jnp.sin(params["w"]) ** 2) + jnp.sum(params["b"] ** 2)


def trajectory(opt, num_steps=5):
    params, state = PARAMS, opt.init(PARAMS)
    out = []
    for _ in range(num_steps):
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out


SGD_KWARGS = [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True)]


@pytest.mark.parametrize("sgd_kwargs", SGD_KWARGS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_pgd_equals_its_chain_exactly(sgd_kwargs, distribution):
    alias = ap.pgd(0.1, 0.05, 0, distribution=distribution, **sgd_kwargs)
    chain = optax.chain(
        optax.sgd(0.1, **sgd_kwargs),
        ap.add_independent_noise(0.05, 0, distribution=distribution),
    )
    chex.assert_trees_all_equal(trajectory(alias), trajectory(chain))


@pytest.mark.parametrize("sgd_kwargs", SGD_KWARGS)
@pytest.mark.parametrize("store_noise", [True, False])
def test_anti_pgd_equals_its_chain_exactly(sgd_kwargs, store_noise):
    alias = ap.anti_pgd(0.1, 0.05, 0, store_noise=store_noise, **sgd_kwargs)
    chain = optax.chain(
        optax.sgd(0.1, **sgd_kwargs),
        ap.add_anticorrelated_noise(0.05, 0, store_noise=store_noise),
    )
    chex.assert_trees_all_equal(trajectory(alias), trajectory(chain))


@pytest.mark.parametrize("alias", [ap.pgd, ap.anti_pgd])
@pytest.mark.parametrize("sgd_kwargs", SGD_KWARGS)
def test_zero_noise_equals_sgd_exactly(alias, sgd_kwargs):
    chex.assert_trees_all_equal(
        trajectory(alias(0.1, 0.0, 0, **sgd_kwargs)),
        trajectory(optax.sgd(0.1, **sgd_kwargs)),
    )


@pytest.mark.parametrize(
    "noise",
    [
        lambda: ap.add_independent_noise(0.5, 0),
        lambda: ap.add_anticorrelated_noise(0.5, 0),
    ],
    ids=["independent", "anticorrelated"],
)
def test_noise_after_sgd_is_unscaled_and_before_sgd_is_scaled_by_lr(noise):
    lr = 0.1
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    after = optax.chain(optax.sgd(lr), noise())  # the paper
    before = optax.chain(noise(), optax.sgd(lr))  # Keras-style code
    reference = noise()
    perturbation, _ = reference.update(zeros, reference.init(PARAMS))
    after_updates, _ = after.update(zeros, after.init(PARAMS), PARAMS)
    before_updates, _ = before.update(zeros, before.init(PARAMS), PARAMS)
    chex.assert_trees_all_equal(after_updates, perturbation)
    chex.assert_trees_all_equal(
        before_updates, jax.tree.map(lambda x: -lr * x, perturbation)
    )


@pytest.mark.parametrize("alias", [ap.pgd, ap.anti_pgd])
def test_aliases_name_every_keyword_for_inject_hyperparams(alias):
    parameters = inspect.signature(alias).parameters
    assert all(p.kind != p.VAR_KEYWORD for p in parameters.values())
    assert parameters["learning_rate"].annotation is optax.ScalarOrSchedule
    opt = optax.inject_hyperparams(alias)(learning_rate=0.1, noise_std=0.05, key=0)
    state = opt.init(PARAMS)
    update = jax.jit(opt.update)
    first, state = update(PARAMS, state, PARAMS)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    state.hyperparams["noise_std"] = jnp.asarray(0.0)
    second, state = update(PARAMS, state, PARAMS)
    chex.assert_trees_all_equal_shapes_and_dtypes(first, PARAMS)
    if alias is ap.pgd:
        chex.assert_trees_all_equal(second, jax.tree.map(jnp.zeros_like, PARAMS))


def test_learning_rate_and_noise_std_may_be_schedules():
    opt = ap.anti_pgd(
        optax.exponential_decay(0.1, 10, 0.5),
        optax.cosine_decay_schedule(0.05, 20),
        0,
        momentum=0.5,
    )
    params = trajectory(opt, 25)[-1]
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))
