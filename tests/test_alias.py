"""The aliases are their chains; the two places the noise can go."""

import functools
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
    update = jax.jit(opt.update)
    out = []
    for _ in range(num_steps):
        updates, state = update(jax.grad(loss)(params), state, params)
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


NOISE_KWARGS = {
    "anti": dict(),
    "regenerated": dict(store_noise=False),
    "partial_cyclic": dict(correlation=0.5, leaves="cyclic"),
    "rademacher": dict(distribution="rademacher"),
}


@pytest.mark.parametrize("sgd_kwargs", SGD_KWARGS)
@pytest.mark.parametrize("noise_kwargs", NOISE_KWARGS.values(), ids=NOISE_KWARGS)
def test_anti_pgd_equals_its_chain_exactly(sgd_kwargs, noise_kwargs):
    alias = ap.anti_pgd(0.1, 0.05, 0, **noise_kwargs, **sgd_kwargs)
    chain = optax.chain(
        optax.sgd(0.1, **sgd_kwargs),
        ap.add_anticorrelated_noise(0.05, 0, **noise_kwargs),
    )
    chex.assert_trees_all_equal(trajectory(alias), trajectory(chain))


@pytest.mark.parametrize("sgd_kwargs", SGD_KWARGS[:2])
@pytest.mark.parametrize("store_noise", [True, False])
def test_fractional_pgd_equals_its_chain_exactly(sgd_kwargs, store_noise):
    alias = ap.fractional_pgd(
        0.1, 0.05, 0, hurst=0.3, num_taps=4, store_noise=store_noise, **sgd_kwargs
    )
    chain = optax.chain(
        optax.sgd(0.1, **sgd_kwargs),
        ap.add_fractional_noise(
            0.05, 0, hurst=0.3, num_taps=4, store_noise=store_noise
        ),
    )
    chex.assert_trees_all_equal(trajectory(alias), trajectory(chain))


@pytest.mark.parametrize("alias", [ap.pgd, ap.anti_pgd])
def test_aliases_pass_accumulator_dtype_to_sgd(alias):
    params = {"w": jnp.ones(4, jnp.bfloat16)}
    opt = alias(0.1, 0.01, 0, momentum=0.9, accumulator_dtype=jnp.float32)
    [momentum] = optax.tree_utils.tree_get_all_with_path(opt.init(params), "trace")
    assert momentum[1]["w"].dtype == jnp.float32
    # The noise state keeps the params' dtype whatever the updates' dtype.
    updates, state = opt.update(params, opt.init(params), params)
    assert updates["w"].dtype == jnp.float32
    chex.assert_trees_all_equal_shapes_and_dtypes(state, opt.init(params))


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


ALIASES = {
    "pgd": ap.pgd,
    "anti_pgd": ap.anti_pgd,
    "fractional_pgd": functools.partial(ap.fractional_pgd, hurst=0.3),
}


@pytest.mark.parametrize("name", ALIASES)
def test_aliases_name_every_keyword_of_what_they_wrap(name):
    alias = getattr(ap, name)
    parameters = inspect.signature(alias).parameters
    assert all(p.kind != p.VAR_KEYWORD for p in parameters.values())
    assert parameters["learning_rate"].annotation is optax.ScalarOrSchedule
    wrapped = {
        "pgd": ap.add_independent_noise,
        "anti_pgd": ap.add_anticorrelated_noise,
        "fractional_pgd": ap.add_fractional_noise,
    }[name]
    sgd = {"momentum", "nesterov", "accumulator_dtype", "learning_rate"}
    assert set(inspect.signature(wrapped).parameters) | sgd == set(parameters)


@pytest.mark.parametrize("name", ALIASES)
def test_inject_hyperparams_sees_learning_rate_and_noise_std(name):
    static = ("hurst", "num_taps") if name == "fractional_pgd" else ()
    opt = optax.inject_hyperparams(ALIASES[name], static_args=static)(
        learning_rate=0.1, noise_std=0.05, key=0
    )
    state = opt.init(PARAMS)
    update = jax.jit(opt.update)
    first, state = update(PARAMS, state, PARAMS)
    expected_first, _ = ALIASES[name](0.1, 0.05, 0).update(
        PARAMS, ALIASES[name](0.1, 0.05, 0).init(PARAMS), PARAMS
    )
    chex.assert_trees_all_close(first, expected_first, rtol=0, atol=1e-7)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    state.hyperparams["noise_std"] = jnp.asarray(0.0)
    second, state = update(PARAMS, state, PARAMS)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    if name == "pgd":
        # No learning rate, no noise: nothing moves.
        chex.assert_trees_all_equal(second, zeros)
    else:
        # The new draw is zero; the noise still in the weights is taken out
        # (for anti_pgd exactly -xi_1, what the first step's xi_1 put in).
        assert not all(np.array_equal(x, 0) for x in jax.tree.leaves(second))
        third, _ = update(PARAMS, state, PARAMS)
        if name == "anti_pgd":
            chex.assert_trees_all_equal(third, zeros)


def test_learning_rate_and_noise_std_may_be_schedules():
    lr = optax.exponential_decay(0.1, 10, 0.5)
    sigma = optax.cosine_decay_schedule(0.05, 20)
    opt = ap.anti_pgd(lr, sigma, 0, momentum=0.5)
    chain = optax.chain(
        optax.sgd(lr, momentum=0.5), ap.add_anticorrelated_noise(sigma, 0)
    )
    trained = trajectory(opt, 25)
    chex.assert_trees_all_equal(trained, trajectory(chain, 25))
    # By step 20 the noise is off and the loss has fallen well below its start.
    assert loss(trained[-1]) < 0.5 * loss(PARAMS)
