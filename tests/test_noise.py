"""The noise law of the two transforms, and how they live in optax."""

import math

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_antipgd as ap

# A leaf this large makes 5-sigma sampling errors of the statistics below
# smaller than their tolerances: std to 0.4%, correlations to 0.005.
BIG = 1_000_000
SIGMA = 0.3


def perturbations(transform, num_steps, size=BIG, dtype=jnp.float32):
    """What ``transform`` adds to zero updates at each of ``num_steps`` steps."""
    params = jnp.zeros(size, dtype)

    def step(state, _):
        updates, state = transform.update(jnp.zeros_like(params), state, params)
        return state, updates

    @jax.jit
    def run():
        return jax.lax.scan(step, transform.init(params), length=num_steps)[1]

    return np.asarray(run(), np.float64)


def corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


ANTI = {
    "stored": dict(),
    "regenerated": dict(store_noise=False),
}


def test_independent_noise_has_std_sigma_and_no_memory():
    p = perturbations(ap.add_independent_noise(SIGMA, key=0), 3)
    for step in p:
        assert abs(step.std() / SIGMA - 1) < 0.01
        assert abs(step.mean()) < 5 * SIGMA / math.sqrt(BIG)
    assert abs(corr(p[0], p[1])) < 0.005
    assert abs(corr(p[1], p[2])) < 0.005


@pytest.mark.parametrize("kwargs", ANTI.values(), ids=ANTI.keys())
def test_consecutive_perturbations_are_anticorrelated(kwargs):
    p = perturbations(ap.add_anticorrelated_noise(SIGMA, 0, **kwargs), 3)
    for step in p:
        assert abs(step.std() / (math.sqrt(2) * SIGMA) - 1) < 0.01
    assert abs(corr(p[0], p[1]) + 0.5) < 0.005
    assert abs(corr(p[1], p[2]) + 0.5) < 0.005
    assert abs(corr(p[0], p[2])) < 0.005


def test_summed_perturbation_stays_bounded_for_antipgd_but_grows_for_pgd():
    num_steps = 50
    anti = perturbations(ap.add_anticorrelated_noise(SIGMA, 0), num_steps)
    indep = perturbations(ap.add_independent_noise(SIGMA, 0), num_steps)
    anti_sum, indep_sum = anti.sum(0), indep.sum(0)
    assert abs(anti_sum.std() / (math.sqrt(2) * SIGMA) - 1) < 0.01
    assert abs(indep_sum.std() / (math.sqrt(num_steps) * SIGMA) - 1) < 0.01


def test_antipgd_perturbations_telescope_to_the_last_minus_the_first_noise():
    transform = ap.add_anticorrelated_noise(SIGMA, 3)
    params = jnp.zeros(1000)
    state = transform.init(params)
    noise_0 = state.noise
    total = jnp.zeros_like(params)
    for _ in range(20):
        updates, state = transform.update(jnp.zeros_like(params), state)
        total = total + updates
    np.testing.assert_allclose(total, state.noise - noise_0, atol=1e-6)


def test_rademacher_noise_is_exactly_plus_minus_sigma():
    sigma = 0.3  # not a power of two: the values must still be exact
    p = perturbations(
        ap.add_independent_noise(sigma, 0, distribution="rademacher"),
        2,
        dtype=jnp.float32,
    )
    assert set(np.unique(p)) == {np.float32(-sigma), np.float32(sigma)}
    # Balanced, and independent within and across the packed 32-bit words.
    assert abs(p[0].mean()) < 5 * sigma / math.sqrt(BIG)
    assert abs(corr(p[0][:-1], p[0][1:])) < 0.005
    assert abs(corr(p[0], p[1])) < 0.005


def test_rademacher_antipgd_perturbations_are_zero_or_two_sigma():
    sigma = 0.3
    transform = ap.add_anticorrelated_noise(sigma, 0, distribution="rademacher")
    p = perturbations(transform, 3)
    s = np.float32(sigma)
    assert set(np.unique(p)) == {-(s + s), 0.0, s + s}
    assert abs(corr(p[0], p[1]) + 0.5) < 0.005


def test_gaussian_noise_has_the_normal_shape():
    z = perturbations(ap.add_independent_noise(1.0, 0), 1)[0]
    assert abs(np.mean(np.abs(z) < 1) - 0.682689) < 0.0025  # 5 sigma of binomial
    assert abs(np.mean(z**4) - 3) < 0.05  # kurtosis: sd of the estimate ~0.01


def test_bfloat16_noise_is_unbiased_with_many_distinct_values():
    p = perturbations(ap.add_independent_noise(SIGMA, 0), 1, dtype=jnp.bfloat16)[0]
    # optax.add_noise draws bf16 normals directly: mean about -0.011 sigma and
    # 128 distinct values. Drawing in float32 and casting avoids both.
    assert abs(p.mean()) < 0.005 * SIGMA
    assert len(np.unique(p)) > 1000
    assert abs(p.std() / SIGMA - 1) < 0.01


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize(
    "make",
    [
        lambda: ap.add_independent_noise(0.1, 0),
        lambda: ap.add_anticorrelated_noise(0.1, 0),
        lambda: ap.add_anticorrelated_noise(0.1, 0, store_noise=False),
        lambda: ap.anti_pgd(0.1, 0.1, 0, distribution="rademacher"),
    ],
)
def test_updates_and_stored_noise_keep_the_params_dtype(make, dtype):
    transform = make()
    params = {"w": jnp.ones((4, 3), dtype), "b": jnp.ones(3, dtype)}
    state = transform.init(params)
    updates, new_state = jax.jit(transform.update)(params, state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    is_anti = lambda x: isinstance(x, ap.AnticorrelatedNoiseState)  # noqa: E731
    for s in jax.tree.leaves(state, is_leaf=is_anti):
        if is_anti(s) and s.noise is not None:
            chex.assert_trees_all_equal_dtypes(s.noise, params)


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("store_noise", [True, False])
def test_float64_leaves_get_float64_noise(x64, store_noise):
    transform = ap.add_anticorrelated_noise(0.1, 0, store_noise=store_noise)
    params = jnp.zeros(BIG // 10, jnp.float64)
    state = transform.init(params)
    updates, _ = jax.jit(transform.update)(jnp.zeros_like(params), state)
    assert updates.dtype == jnp.float64
    # Drawn in float64: far more distinct values than float32 could give.
    assert not np.array_equal(updates, updates.astype(np.float32).astype(np.float64))


def test_int_bool_and_none_leaves_pass_through_untouched():
    params = {
        "w": jnp.zeros(5),
        "step": jnp.arange(3),
        "flag": jnp.array([True, False]),
        "nothing": None,
    }
    for transform in (
        ap.add_independent_noise(1.0, 0),
        ap.add_anticorrelated_noise(1.0, 0),
        ap.add_anticorrelated_noise(1.0, 0, store_noise=False),
    ):
        state = transform.init(params)
        updates, _ = transform.update(params, state)
        assert updates["nothing"] is None
        np.testing.assert_array_equal(updates["step"], params["step"])
        np.testing.assert_array_equal(updates["flag"], params["flag"])
        assert not np.array_equal(updates["w"], params["w"])


@pytest.mark.parametrize("store_noise", [True, False])
def test_masked_leaves_get_no_noise(store_noise):
    params = {"w": jnp.zeros(4), "frozen": jnp.zeros(4)}
    noise = ap.add_anticorrelated_noise(1.0, 0, store_noise=store_noise)
    opt = optax.chain(optax.sgd(0.1), optax.masked(noise, {"w": True, "frozen": False}))
    state = opt.init(params)
    updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state)
    np.testing.assert_array_equal(updates["frozen"], -0.1 * jnp.ones(4))
    assert not np.array_equal(updates["w"], -0.1 * jnp.ones(4))


def test_denoising_skips_masked_leaves_of_a_stored_state():
    params = {"w": jnp.zeros(4), "frozen": jnp.zeros(4)}
    mask = {"w": True, "frozen": False}
    opt = optax.masked(ap.add_anticorrelated_noise(1.0, 0), mask)
    state = opt.init(params)
    denoised = ap.denoised_params(state, params)
    np.testing.assert_array_equal(denoised["frozen"], params["frozen"])
    np.testing.assert_array_equal(denoised["w"], -state.inner_state.noise["w"])


def test_denoising_refuses_a_masked_state_that_does_not_store_the_noise():
    params = {"w": jnp.zeros(4), "frozen": jnp.zeros(4)}
    noise = ap.add_anticorrelated_noise(1.0, 0, store_noise=False)
    state = optax.masked(noise, {"w": True, "frozen": False}).init(params)
    with pytest.raises(ValueError, match="optax.masked"):
        ap.denoised_params(state, params)


def test_adding_a_leaf_leaves_every_other_leafs_noise_unchanged():
    transform = ap.add_anticorrelated_noise(1.0, 0)
    small = {"a": jnp.zeros(10), "c": {"d": jnp.zeros((2, 3))}}
    big = {"a": jnp.zeros(10), "b": jnp.zeros(7), "c": {"d": jnp.zeros((2, 3))}}
    small_updates, _ = transform.update(small, transform.init(small))
    big_updates, _ = transform.update(big, transform.init(big))
    chex.assert_trees_all_equal(small_updates, {k: big_updates[k] for k in small})


def test_leaves_with_the_same_shape_get_different_noise():
    transform = ap.add_independent_noise(1.0, 0)
    params = {"a": jnp.zeros(100), "b": jnp.zeros(100), "c": [jnp.zeros(100)]}
    updates, _ = transform.update(params, transform.init(params))
    assert not np.array_equal(updates["a"], updates["b"])
    assert not np.array_equal(updates["a"], updates["c"][0])


ALL_TRANSFORMS = {
    "independent": lambda key: ap.add_independent_noise(0.5, key),
    "anticorrelated": lambda key: ap.add_anticorrelated_noise(0.5, key),
    "regenerated": lambda key: ap.add_anticorrelated_noise(0.5, key, store_noise=False),
    "rademacher": lambda key: ap.add_anticorrelated_noise(
        0.5, key, distribution="rademacher"
    ),
}


def _run(transform, params, num_steps, jit=True):
    update = jax.jit(transform.update) if jit else transform.update
    state = transform.init(params)
    out = []
    for i in range(num_steps):
        grads = jax.tree.map(lambda p, i=i: jnp.full_like(p, i), params)
        updates, state = update(grads, state, params)
        out.append(updates)
    return out, state


@pytest.mark.parametrize("make", ALL_TRANSFORMS.values(), ids=ALL_TRANSFORMS.keys())
def test_same_key_gives_the_same_updates_with_and_without_jit(make):
    params = {"w": jnp.zeros((30, 20)), "b": jnp.zeros(20)}
    jitted, _ = _run(make(7), params, 3, jit=True)
    again, _ = _run(make(7), params, 3, jit=True)
    eager, _ = _run(make(7), params, 3, jit=False)
    other, _ = _run(make(8), params, 3, jit=True)
    chex.assert_trees_all_equal(jitted, again)
    # Eager and jitted code may fuse differently: equal to float32 rounding of
    # sums of terms of size <= 4 (grad + two noises), 4 * eps = 5e-7.
    chex.assert_trees_all_close(jitted, eager, rtol=0, atol=5e-7)
    assert not np.array_equal(jitted[0]["w"], other[0]["w"])


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_both_store_modes_give_the_same_updates(distribution):
    params = {"w": jnp.zeros((30, 20)), "b": jnp.zeros(20)}
    schedule = optax.linear_schedule(0.5, 0.0, 4)  # scale changes every step
    stored, _ = _run(
        ap.add_anticorrelated_noise(schedule, 0, distribution=distribution),
        params,
        6,
    )
    regenerated, state = _run(
        ap.add_anticorrelated_noise(
            schedule, 0, distribution=distribution, store_noise=False
        ),
        params,
        6,
    )
    chex.assert_trees_all_close(stored, regenerated, rtol=1e-6, atol=1e-7)
    assert jax.tree.leaves(state.noise) == []  # no params-sized tree


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_store_modes_agree_for_every_key_impl(impl):
    params = {"w": jnp.zeros((8, 8))}
    key = jax.random.key(1, impl=impl)
    stored, s1 = _run(ap.add_anticorrelated_noise(0.5, key), params, 3)
    regen, s2 = _run(
        ap.add_anticorrelated_noise(0.5, key, store_noise=False), params, 3
    )
    chex.assert_trees_all_close(stored, regen, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(
        ap.denoised_params(s1, params), ap.denoised_params(s2, params), atol=1e-7
    )


def test_store_modes_agree_when_noise_std_changes_under_inject_hyperparams():
    params = {"w": jnp.zeros(50)}
    results = []
    for store_noise in (True, False):
        opt = optax.inject_hyperparams(ap.anti_pgd)(
            learning_rate=0.1, noise_std=0.5, key=0, store_noise=store_noise
        )
        state = opt.init(params)
        update = jax.jit(opt.update)
        out = []
        for noise_std in (0.5, 0.2, 0.0, 0.7):
            state.hyperparams["noise_std"] = jnp.asarray(noise_std)
            updates, state = update(params, state, params)
            out.append(updates)
        results.append(out)
    chex.assert_trees_all_close(*results, rtol=1e-6, atol=1e-7)


def test_a_schedule_reaching_zero_cancels_the_last_noise_then_adds_nothing():
    transform = ap.add_anticorrelated_noise(
        optax.piecewise_constant_schedule(0.5, {3: 0.0}), 0
    )
    params = jnp.zeros(1000)
    state = transform.init(params)
    total = jnp.zeros_like(params)
    for step in range(8):
        updates, state = transform.update(jnp.zeros_like(params), state)
        total = total + updates
        if step >= 2:  # update 2 draws xi_3 = sigma(3) z_3 = 0
            np.testing.assert_array_equal(state.noise, 0.0)
        if step >= 3:
            np.testing.assert_array_equal(updates, 0.0)
    np.testing.assert_allclose(total, -transform.init(params).noise, atol=1e-6)


def test_a_schedule_starting_at_zero_draws_a_zero_first_noise():
    transform = ap.add_anticorrelated_noise(optax.linear_schedule(0.0, 1.0, 10), 0)
    state = transform.init(jnp.zeros(10))
    np.testing.assert_array_equal(state.noise, 0.0)
    assert float(state.noise_std) == 0.0


@pytest.mark.parametrize("store_noise", [True, False])
def test_denoised_params_follow_gradient_descent_exactly(store_noise):
    # Dyadic numbers (lr and sigma powers of two, +-sigma noise, integer
    # params) make every float operation exact, so the identity
    # v_{n+1} = v_n - lr * grad(w_n) must hold bit for bit.
    lr = 0.25
    opt = ap.anti_pgd(lr, 0.5, 0, distribution="rademacher", store_noise=store_noise)
    grad = jax.grad(lambda w: 0.5 * jnp.sum(w["w"] ** 2))
    params = {"w": jnp.arange(-8.0, 8.0)}
    state = opt.init(params)
    denoised = ap.denoised_params(state, params)
    for _ in range(10):
        g = grad(params)
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
        expected = jax.tree.map(lambda v, gi: v - lr * gi, denoised, g)
        denoised = ap.denoised_params(state, params)
        chex.assert_trees_all_equal(denoised, expected)


def test_denoised_params_follow_gradient_descent_with_gaussian_noise():
    lr = 0.1
    opt = ap.anti_pgd(lr, 0.3, 0)
    grad = jax.grad(lambda w: jnp.sum(jnp.sin(w) ** 2))
    params = jnp.linspace(-1, 1, 100)
    state = opt.init(params)
    denoised = ap.denoised_params(state, params)
    for _ in range(10):
        g = grad(params)
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
        expected = denoised - lr * g
        denoised = ap.denoised_params(state, params)
        # w - xi in float32: rounding of the order of |w| * eps.
        np.testing.assert_allclose(denoised, expected, atol=1e-6)


def test_denoised_params_remove_the_noise_of_every_anticorrelated_state():
    opt = optax.chain(
        ap.add_anticorrelated_noise(1.0, 0),
        ap.add_anticorrelated_noise(1.0, 1, store_noise=False),
    )
    params = jnp.zeros(20)
    state = opt.init(params)
    start = ap.denoised_params(state, params)  # w_0 - xi_0 - xi'_0
    for _ in range(3):
        updates, state = opt.update(jnp.zeros_like(params), state)
        params = optax.apply_updates(params, updates)
    # With zero gradients the noise-free iterate does not move.
    np.testing.assert_allclose(ap.denoised_params(state, params), start, atol=1e-6)
    assert not np.allclose(start, 0.0)


def test_denoised_params_rejects_a_state_without_anticorrelated_noise():
    state = ap.pgd(0.1, 0.1, 0).init(jnp.zeros(3))
    with pytest.raises(ValueError, match="AnticorrelatedNoiseState"):
        ap.denoised_params(state, jnp.zeros(3))


def test_denoised_params_works_under_jit_and_vmap():
    params = jnp.zeros(6)

    def final_denoised(seed):
        opt = ap.anti_pgd(0.1, 0.5, seed, store_noise=False)
        state = opt.init(params)
        updates, state = opt.update(jnp.ones(6), state, params)
        return ap.denoised_params(state, optax.apply_updates(params, updates))

    batched = jax.jit(jax.vmap(final_denoised))(jnp.arange(3))
    np.testing.assert_allclose(batched[1], final_denoised(1), atol=1e-6)


@pytest.mark.parametrize("make", ALL_TRANSFORMS.values(), ids=ALL_TRANSFORMS.keys())
def test_state_holds_plain_numeric_arrays_that_serialize(make):
    params = {"w": jnp.zeros((3, 2)), "i": jnp.arange(2)}
    transform = make(jax.random.key(0, impl="rbg"))
    state = transform.init(params)
    _, state = transform.update(params, state)
    for leaf in jax.tree.leaves(state):
        array = np.asarray(leaf)
        assert array.dtype.kind in "iuf" or array.dtype == jnp.bfloat16
    restored = flax.serialization.from_bytes(state, flax.serialization.to_bytes(state))
    chex.assert_trees_all_equal(
        transform.update(params, state)[0], transform.update(params, restored)[0]
    )


@pytest.mark.parametrize("make", ALL_TRANSFORMS.values(), ids=ALL_TRANSFORMS.keys())
def test_state_types_are_stable_so_jit_does_not_recompile(make):
    transform = make(0)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2, jnp.bfloat16)}
    state = transform.init(params)

    traces = []

    @jax.jit
    def update(updates, state):
        traces.append(1)
        return transform.update(updates, state)

    for _ in range(3):
        _, state = update(params, state)
    assert len(traces) == 1
    init_state = transform.init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(init_state, state)
    # The state can flow through lax.cond, whose branches must agree in type.
    jax.lax.cond(True, lambda: init_state, lambda: transform.update(params, state)[1])


def test_works_with_multisteps_advancing_the_noise_once_per_accumulated_step():
    params = jnp.zeros(10)
    inner = ap.anti_pgd(0.1, 0.5, 0)
    multi = optax.MultiSteps(inner, every_k_schedule=2)
    state = multi.init(params)
    for i in range(4):
        updates, state = multi.update(jnp.full(10, float(i)), state, params)
        if i % 2 == 0:
            np.testing.assert_array_equal(updates, 0.0)
    assert int(state.inner_opt_state[1].count) == 2
    # Equal to the inner optimizer on the averaged gradients.
    inner_state = inner.init(params)
    for mean_grad in (0.5, 2.5):
        expected, inner_state = inner.update(jnp.full(10, mean_grad), inner_state)
    np.testing.assert_allclose(updates, expected, atol=1e-7)


@pytest.mark.parametrize("store_noise", [True, False])
def test_a_skipped_nan_step_does_not_advance_the_noise(store_noise):
    params = jnp.zeros(10)
    opt = optax.apply_if_finite(
        ap.anti_pgd(0.1, 0.5, 0, store_noise=store_noise), max_consecutive_errors=3
    )
    clean = ap.anti_pgd(0.1, 0.5, 0, store_noise=store_noise)
    state, clean_state = opt.init(params), clean.init(params)
    updates, state = opt.update(jnp.ones(10), state, params)
    expected, clean_state = clean.update(jnp.ones(10), clean_state, params)
    # apply_if_finite compiles the inner update as a whole (lax.cond), the
    # clean run goes op by op: equal to float32 rounding of terms of size ~2.
    np.testing.assert_allclose(updates, expected, rtol=0, atol=5e-7)
    skipped, state = opt.update(jnp.full(10, jnp.nan), state, params)
    np.testing.assert_array_equal(skipped, 0.0)
    for leaf in jax.tree.leaves(state):
        assert not np.isnan(np.asarray(leaf, np.float64)).any()
    updates, state = opt.update(jnp.ones(10), state, params)
    expected, clean_state = clean.update(jnp.ones(10), clean_state, params)
    np.testing.assert_allclose(updates, expected, rtol=0, atol=5e-7)
    chex.assert_trees_all_equal(state.inner_state, clean_state)


def test_noise_std_can_be_a_traced_hyperparameter():
    params = jnp.zeros(1000)

    def perturbation_std(noise_std):
        transform = ap.add_anticorrelated_noise(noise_std, 0)
        updates, _ = transform.update(jnp.zeros_like(params), transform.init(params))
        return jnp.std(updates)

    stds = jax.jit(jax.vmap(perturbation_std))(jnp.array([0.0, 0.1, 1.0]))
    assert float(stds[0]) == 0.0
    np.testing.assert_allclose(stds[1:] / jnp.array([0.1, 1.0]), math.sqrt(2), rtol=0.1)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), np.float32(-1.0)])
@pytest.mark.parametrize(
    "factory", [ap.add_independent_noise, ap.add_anticorrelated_noise]
)
def test_negative_or_nan_noise_std_is_rejected(factory, bad):
    with pytest.raises(ValueError, match="noise_std"):
        factory(bad, 0)


@pytest.mark.parametrize("bad", ["0.1", None, jnp.ones(3)])
def test_noise_std_of_the_wrong_kind_is_rejected(bad):
    with pytest.raises((TypeError, ValueError), match="noise_std"):
        ap.add_anticorrelated_noise(bad, 0)


@pytest.mark.parametrize(
    "factory", [ap.add_independent_noise, ap.add_anticorrelated_noise]
)
def test_unknown_distribution_is_rejected(factory):
    with pytest.raises(ValueError, match="distribution"):
        factory(0.1, 0, distribution="uniform")
