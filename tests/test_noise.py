"""The noise law of the transforms: statistics, exact identities, and the state."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_antipgd as ap
from optax_antipgd import _filters
from tests.test_draws import _reference_tree_noise

SIGMA = 0.3

# name -> (factory of key -> transform, its coefficients, or None for i.i.d.).
FAMILY = {
    "independent": (lambda key: ap.add_independent_noise(SIGMA, key), (1.0,)),
    "anti": (lambda key: ap.add_anticorrelated_noise(SIGMA, key), (1.0, -1.0)),
    "anti_regenerated": (
        lambda key: ap.add_anticorrelated_noise(SIGMA, key, store_noise=False),
        (1.0, -1.0),
    ),
    "partial_0.5": (
        lambda key: ap.add_anticorrelated_noise(SIGMA, key, correlation=0.5),
        (1.0, -0.5),
    ),
    "partial_0": (
        lambda key: ap.add_anticorrelated_noise(SIGMA, key, correlation=0.0),
        (1.0, 0.0),
    ),
    "three_taps_regenerated": (
        lambda key: ap.add_correlated_noise(
            SIGMA, key, coefficients=(0.8, -0.5, 0.3), store_noise=False
        ),
        (0.8, -0.5, 0.3),
    ),
    "fractional_0.25": (
        lambda key: ap.add_fractional_noise(SIGMA, key, hurst=0.25),
        tuple(ap.fractional_coefficients(0.25, 8)),
    ),
    "rademacher_anti": (
        lambda key: ap.add_anticorrelated_noise(SIGMA, key, distribution="rademacher"),
        (1.0, -1.0),
    ),
}


def perturbations(transform, num_steps, size, dtype=jnp.float32):
    """What ``transform`` adds to zero updates at each of ``num_steps`` steps."""
    params = jnp.zeros(size, dtype)

    def step(state, _):
        updates, state = transform.update(jnp.zeros_like(params), state, params)
        return state, updates

    @jax.jit
    def run():
        return jax.lax.scan(step, transform.init(params), length=num_steps)[1]

    return np.asarray(run(), np.float64)


def autocovariances(p, max_lag):
    """Mean of p[n] * p[n + k] over steps n and elements, for k = 0..max_lag.

    Pooled over the same number of step pairs at every lag, so that the
    estimates have comparable errors.
    """
    num_pairs = p.shape[0] - max_lag
    return np.array(
        [np.mean(p[:num_pairs] * p[k : k + num_pairs]) for k in range(max_lag + 1)]
    )


@pytest.mark.parametrize("name", FAMILY)
def test_perturbations_have_the_filters_autocovariance(name):
    # Cov(p_n, p_{n+k}) = sigma^2 sum_j c_j c_{j+k} per element, at every lag
    # (0 beyond the filter's length). 250k elements x 24 pooled step pairs:
    # each estimate has a standard error below sigma^2 sqrt(2 (1 + rho^2) /
    # 6M) (the factor 2 bounds the correlation between overlapping pairs);
    # the tolerance is 5 of those.
    make, coefficients = FAMILY[name]
    c = np.asarray(coefficients)
    max_lag = 8
    p = perturbations(make(0), 24 + max_lag, 250_000)
    expected = SIGMA**2 * np.array(
        [c[: len(c) - k] @ c[k:] if k < len(c) else 0.0 for k in range(max_lag + 1)]
    )
    estimate = autocovariances(p, max_lag)
    rho = expected / expected[0]
    tolerance = 5 * SIGMA**2 * np.sqrt(2 * (1 + rho**2) / (24 * 250_000))
    np.testing.assert_array_less(np.abs(estimate - expected), tolerance)


@pytest.mark.parametrize("correlation", [0.25, 0.5, 0.75])
def test_partial_anticorrelation_has_its_variance_and_lag_one_correlation(
    correlation,
):
    # Variance (1 + c^2) sigma^2, lag-1 autocorrelation -c / (1 + c^2), lag 2
    # zero: 1M elements, so 5 standard errors are 0.5% of the variance and
    # 0.005 of a correlation.
    transform = ap.add_anticorrelated_noise(SIGMA, 0, correlation=correlation)
    p = perturbations(transform, 3, 1_000_000)
    variance = (1 + correlation**2) * SIGMA**2
    for step in p:
        assert abs(step.var() / variance - 1) < 0.005 * 2
    assert (
        abs(np.corrcoef(p[0], p[1])[0, 1] + correlation / (1 + correlation**2)) < 5e-3
    )
    assert abs(np.corrcoef(p[0], p[2])[0, 1]) < 5e-3


@pytest.mark.parametrize("hurst", [0.1, 0.25, 0.4])
def test_fractional_perturbations_match_fgn_at_lags_1_to_8(hurst):
    # fGn's rho(k) to within 0.01: the 8-tap filter is within 0.007 of it
    # (tests/test_filters.py), and the estimates' 5 standard errors are
    # below 0.003 (300k elements x 24 pooled step pairs).
    transform = ap.add_fractional_noise(SIGMA, 0, hurst=hurst)
    p = perturbations(transform, 24 + 8, 300_000)
    covariance = autocovariances(p, 8)
    estimate = covariance[1:] / covariance[0]
    error = np.abs(estimate - _filters.fgn_autocorrelation(hurst, np.arange(1, 9)))
    assert np.max(error) < 0.01, error
    assert abs(covariance[0] / SIGMA**2 - 1) < 0.005


def test_summed_perturbation_stays_bounded_for_antipgd_but_grows_for_pgd():
    num_steps = 50
    anti = perturbations(ap.add_anticorrelated_noise(SIGMA, 0), num_steps, 200_000)
    indep = perturbations(ap.add_independent_noise(SIGMA, 0), num_steps, 200_000)
    # 5 standard errors of a std estimated from 200k samples: 0.8%.
    assert abs(anti.sum(0).std() / (math.sqrt(2) * SIGMA) - 1) < 0.008
    assert abs(indep.sum(0).std() / (math.sqrt(num_steps) * SIGMA) - 1) < 0.008


@pytest.mark.parametrize("store_noise", [True, False])
def test_antipgd_perturbations_telescope_to_the_last_minus_the_first_noise(
    store_noise,
):
    transform = ap.add_anticorrelated_noise(SIGMA, 3, store_noise=store_noise)
    stored = ap.add_anticorrelated_noise(SIGMA, 3)  # its state holds xi_n
    params = jnp.zeros(1000)
    state, stored_state = transform.init(params), stored.init(params)
    noise_0 = stored_state.noise[0]
    total = jnp.zeros_like(params)
    update, stored_update = jax.jit(transform.update), jax.jit(stored.update)
    for _ in range(20):
        updates, state = update(jnp.zeros_like(params), state)
        _, stored_state = stored_update(jnp.zeros_like(params), stored_state)
        total = total + updates
    # Sums of 20 float32 differences of terms of size ~1: rounding only.
    np.testing.assert_allclose(total, stored_state.noise[0] - noise_0, atol=1e-6)


def test_rademacher_noise_is_exactly_plus_minus_sigma():
    sigma = 0.3  # not a power of two: the values must still be exact
    p = perturbations(
        ap.add_independent_noise(sigma, 0, distribution="rademacher"), 2, 1_000_000
    )
    assert set(np.unique(p)) == {np.float32(-sigma), np.float32(sigma)}
    # Balanced, and independent within and across the packed 32-bit words.
    assert abs(p[0].mean()) < 5 * sigma / math.sqrt(1_000_000)
    assert abs(np.corrcoef(p[0][:-1], p[0][1:])[0, 1]) < 0.005
    assert abs(np.corrcoef(p[0], p[1])[0, 1]) < 0.005


def test_rademacher_antipgd_perturbations_are_zero_or_two_sigma():
    sigma = 0.3
    transform = ap.add_anticorrelated_noise(sigma, 0, distribution="rademacher")
    p = perturbations(transform, 2, 100_000)
    s = np.float32(sigma)
    assert set(np.unique(p)) == {-(s + s), 0.0, s + s}


def test_gaussian_noise_has_the_normal_shape():
    z = perturbations(ap.add_independent_noise(1.0, 0), 1, 1_000_000)[0]
    assert abs(np.mean(np.abs(z) < 1) - 0.682689) < 0.0025  # 5 sigma of binomial
    assert abs(np.mean(z**4) - 3) < 0.05  # kurtosis: sd of the estimate ~0.01


def test_bfloat16_noise_is_unbiased_with_many_distinct_values():
    p = perturbations(ap.add_independent_noise(SIGMA, 0), 1, 1_000_000, jnp.bfloat16)[0]
    # optax.add_noise draws bf16 normals directly: mean about -0.011 sigma and
    # 128 distinct values. Drawing in float32 and casting avoids both.
    assert abs(p.mean()) < 0.005 * SIGMA
    assert len(np.unique(p)) > 1000
    assert abs(p.std() / SIGMA - 1) < 0.01


# ---------------------------------------------------------------- exact laws

TREE = {
    "w": jnp.linspace(-1.0, 1.0, 60).reshape(6, 10),
    "layers": [jnp.full((6, 10), 0.5), jnp.full((6, 10), -0.5)],
    "b": jnp.ones(10, jnp.bfloat16),
    "step": jnp.arange(3),
    "nothing": None,
}


def _floats(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def assert_equal_up_to_rounding(actual, expected, ulps=2):
    """Equal but for rounding: within ``ulps`` ulps of each leaf's largest value.

    For results of two separately compiled programs (the library against a
    reference, or the two store modes). The same expressions from the same
    draws, but XLA fuses each program on its own and may contract ``a * b + c``
    into one FMA in one and not in the other, which moves the last bit; on
    one CPU it did not, on another it did, by one ulp. Eager runs, op by op,
    are compared exactly (``test_properties.py``).
    """
    chex.assert_trees_all_equal_structs(actual, expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        if not jnp.issubdtype(e.dtype, jnp.floating):
            np.testing.assert_array_equal(a, e)
            continue
        e64 = np.asarray(e, np.float64)
        ulp = float(jnp.finfo(e.dtype).eps) * np.max(np.abs(e64), initial=0.0)
        np.testing.assert_allclose(
            np.asarray(a, np.float64), e64, rtol=0, atol=ulps * ulp
        )


def _anti_pgd_as_released(noise_std, key, distribution, store_noise):
    """Anti-PGD as 0.1.0 computed it: ``u + (xi_{n+1} - xi_n)``, xi_0 by init.

    Each draw is compiled on its own (its output a buffer of its own, as the
    library's loop draws are), then combined.
    """
    draw = jax.jit(
        lambda step, tree: _reference_tree_noise(
            key, step, tree, noise_std, distribution
        )
    )
    combine = jax.jit(
        lambda updates, new, noise: jax.tree.map(
            lambda u, a, b: u if a is None else u + (a - b), updates, new, noise
        )
    )

    def init(params):
        return (0, draw(0, params))

    def update(updates, state):
        count, noise = state
        new = draw(count + 1, updates)
        if not store_noise:
            noise = draw(count, updates)
        return combine(updates, new, noise), (count + 1, new)

    return init, update


@pytest.mark.parametrize("store_noise", [True, False])
@pytest.mark.parametrize(
    ("distribution", "impl"),
    [("gaussian", "threefry2x32"), ("rademacher", "threefry2x32"), ("gaussian", "rbg")],
)
def test_anti_pgd_gives_the_numbers_it_always_gave(distribution, impl, store_noise):
    # correlation=1.0 (the default) and coefficients=(1, -1) compute Anti-PGD
    # as 0.1.0 did, expression for expression: bit for bit against 0.1.0 itself
    # on the machine where that was checked, and here against a reference
    # compiled on its own, up to XLA's fusion choices.
    key = jax.random.key(5, impl=impl)
    init, update = _anti_pgd_as_released(
        jnp.float32(SIGMA), key, distribution, store_noise
    )
    transforms = [
        ap.add_anticorrelated_noise(
            SIGMA, key, distribution=distribution, store_noise=store_noise
        ),
        ap.add_correlated_noise(
            SIGMA,
            key,
            coefficients=(1.0, -1.0),
            distribution=distribution,
            store_noise=store_noise,
        ),
    ]
    grads = jax.tree.map(
        lambda x: x * 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x, TREE
    )
    reference_state = init(TREE)
    states = [jax.jit(t.init)(TREE) for t in transforms]
    steps = [jax.jit(t.update) for t in transforms]
    for _ in range(4):
        expected, reference_state = update(grads, reference_state)
        for index, step in enumerate(steps):
            updates, states[index] = step(grads, states[index])
            assert_equal_up_to_rounding(updates, expected)


@pytest.mark.parametrize("transform", ["independent", "anti"])
def test_cyclic_noise_draws_one_float_leaf_per_step_in_tree_order(transform):
    num_floats = len(_floats(TREE))
    make = (
        ap.add_independent_noise
        if transform == "independent"
        else ap.add_anticorrelated_noise
    )
    opt = make(SIGMA, 0, leaves="cyclic")
    zeros = jax.tree.map(jnp.zeros_like, TREE)
    state = opt.init(TREE)
    update = jax.jit(opt.update)
    total = jax.tree.map(jnp.zeros_like, zeros)
    drawn_at = []
    for step in range(2 * num_floats):
        updates, state = update(zeros, state)
        assert updates["nothing"] is None
        np.testing.assert_array_equal(updates["step"], zeros["step"])
        touched = [i for i, x in enumerate(_floats(updates)) if bool(jnp.any(x != 0))]
        if transform == "independent":
            assert touched == [step % num_floats]
        else:
            # xi_{n+1} on leaf n+1 mod L, minus xi_n on leaf n mod L.
            assert touched == sorted({step % num_floats, (step + 1) % num_floats})
        drawn_at.append(touched)
        total = jax.tree.map(lambda t, u: t + u.astype(t.dtype), total, updates)
    if transform == "anti":
        # The sum telescopes: the weights carry xi_{2L} - xi_0, one leaf each.
        xi_0 = (
            ap.add_anticorrelated_noise(SIGMA, 0, leaves="cyclic").init(TREE).noise[0]
        )
        expected = [
            (a - b).astype(jnp.float32)
            for a, b in zip(_floats(state.noise[0]), _floats(xi_0), strict=True)
        ]
        actual = [x.astype(jnp.float32) for x in _floats(total)]
        # Sums of 2L terms; bfloat16 rounding on the bfloat16 leaf.
        chex.assert_trees_all_close(actual, expected, rtol=0, atol=2**-6)


ZERO_SUM = {
    "anti": (1.0, -1.0),
    "three_taps": (1.0, -0.5, -0.5),
    "four_taps": (1.0, -0.25, -0.25, -0.5),
}


@pytest.mark.parametrize("store_noise", [True, False])
@pytest.mark.parametrize("filter_name", [*ZERO_SUM, "fractional", "partial"])
def test_a_schedule_reaching_zero_stops_all_noise_within_k_minus_1_steps(
    filter_name, store_noise
):
    coefficients = {
        **ZERO_SUM,
        "fractional": tuple(ap.fractional_coefficients(0.3, 5)),
        "partial": (1.0, -0.5),
    }[filter_name]
    num_taps = len(coefficients)
    off_at = 4  # sigma(n) = 0 for n >= 4: update 3 draws the last zero xi_4
    transform = ap.add_correlated_noise(
        optax.piecewise_constant_schedule(SIGMA, {off_at: 0.0}),
        0,
        coefficients=coefficients,
        store_noise=store_noise,
    )
    params = jnp.zeros(500)
    state = transform.init(params)
    update = jax.jit(transform.update)
    total = jnp.zeros_like(params)
    for step in range(off_at + num_taps + 3):
        updates, state = update(jnp.zeros_like(params), state)
        total = total + updates
        # Update n adds sum_j c_j xi_{n+1-j}: zero once n + 2 - K >= off_at.
        if step + 2 - num_taps >= off_at:
            np.testing.assert_array_equal(updates, 0.0)
        else:
            assert np.any(updates != 0)
    if filter_name in ZERO_SUM:
        # All the noise put in was taken out: the weights are back where the
        # pre-history left them, w - (noise of init) = denoised_params at 0.
        start = ap.denoised_params(transform.init(params), params)
        np.testing.assert_allclose(total, start, atol=1e-6)
        np.testing.assert_array_equal(ap.denoised_params(state, total), total)


@pytest.mark.parametrize("store_noise", [True, False])
@pytest.mark.parametrize("coefficients", ZERO_SUM.values(), ids=ZERO_SUM)
def test_denoised_params_follow_gradient_descent_exactly(coefficients, store_noise):
    # Dyadic numbers (lr, sigma and coefficients powers of two, +-sigma noise,
    # integer params) make every float operation exact, so the identity
    # v_{n+1} = v_n - lr * grad(w_n) must hold bit for bit.
    lr = 0.25
    opt = optax.chain(
        optax.sgd(lr),
        ap.add_correlated_noise(
            0.5,
            0,
            coefficients=coefficients,
            distribution="rademacher",
            store_noise=store_noise,
        ),
    )
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


def test_denoised_params_of_a_filter_not_summing_to_zero_removes_the_noise_in_flight():
    # c = (1, -0.5): D_0 = 1, so the noise in flight is xi_n, as documented.
    transform = ap.add_anticorrelated_noise(SIGMA, 0, correlation=0.5)
    params = jnp.linspace(-1.0, 1.0, 50)
    state = transform.init(params)
    for _ in range(3):
        _, state = transform.update(jnp.zeros_like(params), state)
    chex.assert_trees_all_equal(
        ap.denoised_params(state, params), params - state.noise[0]
    )


def test_denoised_params_remove_the_noise_of_every_correlated_state():
    opt = optax.chain(
        ap.add_anticorrelated_noise(1.0, 0),
        ap.add_correlated_noise(
            1.0, 1, coefficients=(1.0, -0.5, -0.5), store_noise=False
        ),
    )
    params = jnp.zeros(20)
    state = opt.init(params)
    start = ap.denoised_params(state, params)  # w_0 minus both pre-histories
    for _ in range(3):
        updates, state = opt.update(jnp.zeros_like(params), state)
        params = optax.apply_updates(params, updates)
    # With zero gradients the noise-free iterate does not move.
    np.testing.assert_allclose(ap.denoised_params(state, params), start, atol=1e-6)
    assert not np.allclose(start, 0.0)


def test_denoised_params_rejects_a_state_without_correlated_noise():
    state = ap.pgd(0.1, 0.1, 0).init(jnp.zeros(3))
    with pytest.raises(ValueError, match="CorrelatedNoiseState"):
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
    assert not np.allclose(batched[0], batched[1])


# ------------------------------------------------- the state and its rules

# Every member of the family with both store modes and cyclic leaves.
TRANSFORMS = {
    "independent": lambda key, std=0.5: ap.add_independent_noise(std, key),
    "independent_cyclic": lambda key, std=0.5: ap.add_independent_noise(
        std, key, leaves="cyclic"
    ),
    "anti": lambda key, std=0.5: ap.add_anticorrelated_noise(std, key),
    "anti_regenerated": lambda key, std=0.5: ap.add_anticorrelated_noise(
        std, key, store_noise=False
    ),
    "anti_rademacher": lambda key, std=0.5: ap.add_anticorrelated_noise(
        std, key, distribution="rademacher"
    ),
    "partial_cyclic": lambda key, std=0.5: ap.add_anticorrelated_noise(
        std, key, correlation=0.5, leaves="cyclic"
    ),
    "fractional": lambda key, std=0.5: ap.add_fractional_noise(std, key, hurst=0.25),
    "fractional_regenerated": lambda key, std=0.5: ap.add_fractional_noise(
        std, key, hurst=0.25, num_taps=4, store_noise=False
    ),
}
CORRELATED = [name for name in TRANSFORMS if not name.startswith("independent")]


def _run(transform, params, num_steps, jit=True):
    update = jax.jit(transform.update) if jit else transform.update
    state = transform.init(params)
    out = []
    for i in range(num_steps):
        grads = jax.tree.map(lambda p, i=i: jnp.full_like(p, i), params)
        updates, state = update(grads, state, params)
        out.append(updates)
    return out, state


@pytest.mark.parametrize("name", TRANSFORMS)
def test_same_key_gives_the_same_updates_with_and_without_jit(name):
    params = {"w": jnp.zeros((30, 20)), "b": jnp.zeros(20)}
    make = TRANSFORMS[name]
    jitted, _ = _run(make(7), params, 3, jit=True)
    again, _ = _run(make(7), params, 3, jit=True)
    eager, _ = _run(make(7), params, 3, jit=False)
    other, _ = _run(make(8), params, 3, jit=True)
    chex.assert_trees_all_equal(jitted, again)
    # Eager and jitted code may fuse differently: equal to float32 rounding of
    # sums of terms of size <= 4 (grad + a few noises), 4 * eps = 5e-7.
    chex.assert_trees_all_close(jitted, eager, rtol=0, atol=5e-7)
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(other), strict=True)
    )


STORE_MODES = {
    "anti": dict(coefficients=(1.0, -1.0)),
    "three_taps": dict(coefficients=(1.0, -0.5, -0.5)),
    "fractional": dict(coefficients=tuple(ap.fractional_coefficients(0.25, 8))),
    "anti_cyclic": dict(coefficients=(1.0, -1.0), leaves="cyclic"),
    "rademacher": dict(coefficients=(1.0, -0.5, 0.25), distribution="rademacher"),
}


@pytest.mark.parametrize("kwargs", STORE_MODES.values(), ids=STORE_MODES)
def test_both_store_modes_give_the_same_updates_and_denoised_params(kwargs):
    params = {"w": jnp.zeros((30, 20)), "b": jnp.zeros(20), "c": jnp.zeros(7)}
    schedule = optax.linear_schedule(0.5, 0.0, 6)  # the scale changes every step
    stored, s1 = _run(ap.add_correlated_noise(schedule, 0, **kwargs), params, 8)
    regenerated, s2 = _run(
        ap.add_correlated_noise(schedule, 0, store_noise=False, **kwargs), params, 8
    )
    # The same expressions from the same draws, in two compiled programs.
    assert_equal_up_to_rounding(stored, regenerated)
    assert_equal_up_to_rounding(
        ap.denoised_params(s1, params), ap.denoised_params(s2, params)
    )
    assert s2.noise == ()  # no params-sized tree


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_store_modes_agree_for_every_key_impl(impl):
    params = {"w": jnp.zeros((8, 8))}
    key = jax.random.key(1, impl=impl)
    stored, s1 = _run(ap.add_anticorrelated_noise(0.5, key), params, 3)
    regen, s2 = _run(
        ap.add_anticorrelated_noise(0.5, key, store_noise=False), params, 3
    )
    assert_equal_up_to_rounding(stored, regen)
    assert_equal_up_to_rounding(
        ap.denoised_params(s1, params), ap.denoised_params(s2, params)
    )


@pytest.mark.parametrize("alias", ["anti_pgd", "fractional_pgd"])
def test_store_modes_agree_when_noise_std_changes_under_inject_hyperparams(alias):
    params = {"w": jnp.zeros(50)}
    extra = dict(hurst=0.25) if alias == "fractional_pgd" else {}
    results = []
    for store_noise in (True, False):
        static = ("hurst", "num_taps") if extra else ()
        opt = optax.inject_hyperparams(getattr(ap, alias), static_args=static)(
            learning_rate=0.1, noise_std=0.5, key=0, store_noise=store_noise, **extra
        )
        state = opt.init(params)
        update = jax.jit(opt.update)
        out = []
        for noise_std in (0.5, 0.2, 0.0, 0.7):
            state.hyperparams["noise_std"] = jnp.asarray(noise_std)
            updates, state = update(params, state, params)
            out.append(updates)
        results.append(out)
    assert_equal_up_to_rounding(*results)


def test_correlation_can_change_mid_run_under_inject_hyperparams():
    params = jnp.zeros(40)
    opt = optax.inject_hyperparams(ap.add_anticorrelated_noise)(
        noise_std=0.5, key=0, correlation=1.0
    )
    draws = ap.add_anticorrelated_noise(0.5, 0)  # its state holds each xi_n
    state, draws_state = opt.init(params), draws.init(params)
    update = jax.jit(opt.update)
    for correlation in (1.0, 0.5, 0.0, 0.25):
        state.hyperparams["correlation"] = jnp.asarray(correlation)
        previous = draws_state.noise[0]
        updates, state = update(jnp.zeros_like(params), state)
        _, draws_state = draws.update(jnp.zeros_like(params), draws_state)
        # u + xi_{n+1} - c_n xi_n, with the c of this step.
        expected = draws_state.noise[0] - correlation * previous
        np.testing.assert_allclose(updates, expected, rtol=0, atol=1e-7)


def test_inject_hyperparams_draws_with_a_schedule_one_step_late():
    # optax.inject_hyperparams evaluates a schedule at the update's count n
    # and builds the transform with that constant, so the update that draws
    # xi_{n+1} uses sigma(n); called directly, the transform uses sigma(n+1).
    # Pinned: injected == direct with the schedule delayed by one step.
    params = jnp.zeros(30)
    schedule = optax.piecewise_constant_schedule(0.5, {2: 0.4, 4: 0.0})
    delayed = lambda count: schedule(jnp.maximum(count - 1, 0))  # noqa: E731
    injected = optax.inject_hyperparams(ap.add_anticorrelated_noise)(
        noise_std=schedule, key=0
    )
    direct = ap.add_anticorrelated_noise(schedule, key=0)
    expected = ap.add_anticorrelated_noise(delayed, key=0)
    got, _ = _run(injected, params, 7)
    direct_updates, _ = _run(direct, params, 7)
    assert_equal_up_to_rounding(got, _run(expected, params, 7)[0])
    grads = [jnp.full_like(params, i) for i in range(7)]
    # Directly, update 3 draws xi_4 = 0 and update 4 adds nothing; injected,
    # that happens one step later.
    np.testing.assert_array_equal(direct_updates[4], grads[4])
    assert not np.array_equal(got[4], grads[4])
    np.testing.assert_array_equal(got[5], grads[5])


def test_a_schedule_starting_at_zero_draws_zero_pre_history():
    transform = ap.add_fractional_noise(
        optax.linear_schedule(0.0, 1.0, 10), 0, hurst=0.3
    )
    state = transform.init(jnp.zeros(10))
    for slot in state.noise:
        np.testing.assert_array_equal(slot, 0.0)
    np.testing.assert_array_equal(state.noise_std, 0.0)


MIXED_PRECISION = {
    "bf16_params_f32_updates": (jnp.bfloat16, jnp.float32),
    "f32_params_bf16_updates": (jnp.float32, jnp.bfloat16),
}


def _mixed(params_dtype, updates_dtype, name, **noise_kwargs):
    params = {"w": jnp.linspace(-1, 1, 24, dtype=params_dtype).reshape(4, 6)}
    if updates_dtype == jnp.float32:
        # momentum accumulated in float32 for bfloat16 params: float32 updates
        sgd = optax.sgd(0.1, momentum=0.9, accumulator_dtype=jnp.float32)
    else:
        sgd = optax.chain(
            optax.sgd(0.1),
            optax.stateless(lambda u, p=None: optax.tree.cast(u, updates_dtype)),
        )
    return params, optax.chain(sgd, TRANSFORMS[name](0, **noise_kwargs))


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("dtypes", MIXED_PRECISION.values(), ids=MIXED_PRECISION)
def test_state_dtypes_stay_fixed_by_init_under_mixed_precision(name, dtypes):
    params, opt = _mixed(*dtypes, name)
    grad = jax.grad(lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2))
    state = opt.init(params)

    def step(carry, _):
        params, state = carry
        updates, state = opt.update(grad(params), state, params)
        return (optax.apply_updates(params, updates), state), None

    # A lax.scan carry must keep its type: this raised a TypeError when the
    # stored noise took the updates' dtype.
    (params_after, state_after), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=3))(
        (params, state)
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(state_after, state)
    chex.assert_trees_all_equal_dtypes(params_after, params)
    # optax.MultiSteps and optax.apply_if_finite put the state through lax.cond
    # (fed gradients in the updates' dtype: apply_if_finite's skipped step
    # returns zeros like its input, whatever the inner optimizer returns).
    grad = lambda p: optax.tree.cast(  # noqa: E731
        jax.grad(lambda p: jnp.sum(p["w"].astype(jnp.float32) ** 2))(p), dtypes[1]
    )
    for wrapped in (
        optax.MultiSteps(opt, every_k_schedule=2),
        optax.apply_if_finite(opt, max_consecutive_errors=2),
    ):
        wrapped_state = wrapped.init(params)
        update = jax.jit(wrapped.update)
        for _ in range(3):
            _, wrapped_state = update(grad(params), wrapped_state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(
            wrapped_state, wrapped.init(params)
        )


@pytest.mark.parametrize("name", TRANSFORMS)
def test_state_types_are_stable_so_jit_does_not_recompile(name):
    transform = TRANSFORMS[name](0)
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
    jax.lax.cond(True, lambda: init_state, lambda: transform.update(params, state)[1])


@pytest.mark.parametrize("name", TRANSFORMS)
def test_state_holds_plain_numeric_arrays_that_serialize(name):
    import flax.serialization

    params = {"w": jnp.zeros((3, 2)), "i": jnp.arange(2)}
    transform = TRANSFORMS[name](jax.random.key(0, impl="rbg"))
    state = transform.init(params)
    _, state = transform.update(params, state)
    for leaf in jax.tree.leaves(state):
        array = np.asarray(leaf)
        assert array.dtype.kind in "iuf" or array.dtype == jnp.bfloat16
    restored = flax.serialization.from_bytes(state, flax.serialization.to_bytes(state))
    chex.assert_trees_all_equal(
        transform.update(params, state)[0], transform.update(params, restored)[0]
    )


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_updates_and_stored_noise_keep_the_params_dtype(name, dtype):
    transform = TRANSFORMS[name](0)
    params = {"w": jnp.ones((4, 3), dtype), "b": jnp.ones(3, dtype)}
    state = transform.init(params)
    updates, new_state = jax.jit(transform.update)(params, state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)
    for slot in getattr(state, "noise", ()):
        chex.assert_trees_all_equal_dtypes(slot, params)


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("store_noise", [True, False])
def test_float64_leaves_get_float64_noise(x64, store_noise):
    transform = ap.add_anticorrelated_noise(0.1, 0, store_noise=store_noise)
    params = jnp.zeros(100_000, jnp.float64)
    state = transform.init(params)
    updates, _ = jax.jit(transform.update)(jnp.zeros_like(params), state)
    assert updates.dtype == jnp.float64
    # Drawn in float64: far more distinct values than float32 could give.
    assert not np.array_equal(updates, updates.astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_int_bool_and_none_leaves_pass_through_untouched(name):
    params = {
        "w": jnp.zeros(5),
        "step": jnp.arange(3),
        "flag": jnp.array([True, False]),
        "nothing": None,
    }
    transform = TRANSFORMS[name](0, std=1.0)
    state = transform.init(params)
    updates, _ = transform.update(params, state)
    assert updates["nothing"] is None
    np.testing.assert_array_equal(updates["step"], params["step"])
    np.testing.assert_array_equal(updates["flag"], params["flag"])
    assert not np.array_equal(updates["w"], params["w"])


@pytest.mark.parametrize("name", TRANSFORMS)
def test_masked_leaves_get_no_noise(name):
    params = {"w": jnp.zeros(4), "frozen": jnp.zeros(4)}
    opt = optax.chain(
        optax.sgd(0.1),
        optax.masked(TRANSFORMS[name](0, std=1.0), {"w": True, "frozen": False}),
    )
    state = opt.init(params)
    updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state)
    np.testing.assert_array_equal(updates["frozen"], -0.1 * jnp.ones(4))
    assert not np.array_equal(updates["w"], -0.1 * jnp.ones(4))


def test_denoising_skips_masked_leaves_of_a_stored_state():
    params = {"w": jnp.zeros(4), "frozen": {"a": jnp.zeros(4), "b": jnp.ones(2)}}
    mask = {"w": True, "frozen": False}
    opt = optax.masked(ap.add_anticorrelated_noise(1.0, 0), mask)
    state = opt.init(params)
    denoised = ap.denoised_params(state, params)
    chex.assert_trees_all_equal(denoised["frozen"], params["frozen"])
    np.testing.assert_array_equal(denoised["w"], -state.inner_state.noise[0]["w"])


def test_denoising_refuses_a_masked_state_that_does_not_store_the_noise():
    params = {"w": jnp.zeros(4), "frozen": jnp.zeros(4)}
    noise = ap.add_anticorrelated_noise(1.0, 0, store_noise=False)
    state = optax.masked(noise, {"w": True, "frozen": False}).init(params)
    with pytest.raises(ValueError, match="optax.masked"):
        ap.denoised_params(state, params)


WRONG_TREES = {
    "linen_variables": lambda p: {"params": p},
    "extra_leaf": lambda p: {**p, "batch_stats": jnp.zeros(3)},
    "missing_leaf": lambda p: {"w": p["w"]},
    "other_shape": lambda p: {**p, "w": jnp.zeros((4, 4))},
    "int_for_float": lambda p: {**p, "b": jnp.zeros(3, jnp.int32)},
}


@pytest.mark.parametrize("store_noise", [True, False])
@pytest.mark.parametrize("wrong", WRONG_TREES.values(), ids=WRONG_TREES)
def test_denoised_params_refuses_a_tree_the_state_was_not_built_for(wrong, store_noise):
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    opt = ap.anti_pgd(0.1, 0.5, 0, store_noise=store_noise)
    state = opt.init(params)
    with pytest.raises(ValueError, match="not the tree the noise state was built for"):
        ap.denoised_params(state, wrong(params))


def test_denoised_params_refuses_another_tree_also_under_jit():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    opt = ap.anti_pgd(0.1, 0.5, 0, store_noise=False)
    state = opt.init(params)
    denoised = jax.jit(ap.denoised_params)
    denoised(state, params)  # the right tree passes
    # The state's record is traced: the check runs on the host at run time.
    with pytest.raises(Exception, match="not the tree the noise state was built for"):
        jax.block_until_ready(denoised(state, {"params": params}))


def test_denoised_params_refuses_params_of_another_dtype_with_stored_noise():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    state = ap.anti_pgd(0.1, 0.5, 0).init(params)
    with pytest.raises(ValueError, match="bfloat16"):
        ap.denoised_params(state, {**params, "b": jnp.zeros(3, jnp.bfloat16)})


@pytest.mark.parametrize("name", ["anti", "fractional"])
def test_update_refuses_a_tree_the_stored_noise_was_not_built_for(name):
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    transform = TRANSFORMS[name](0)
    state = transform.init(params)
    with pytest.raises(ValueError, match="not the tree the noise state was built for"):
        transform.update({"params": params}, state)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_complex_leaves_are_refused_at_init_naming_the_path(name):
    params = {"w": jnp.zeros(3), "z": {"field": jnp.zeros(2, jnp.complex64)}}
    with pytest.raises(TypeError, match=r"complex.*\['z'\]\['field'\]"):
        TRANSFORMS[name](0).init(params)


def test_adding_a_leaf_leaves_every_other_leafs_noise_unchanged():
    transform = ap.add_fractional_noise(1.0, 0, hurst=0.3)
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


def test_works_with_multisteps_advancing_the_noise_once_per_accumulated_step():
    params = jnp.zeros(10)
    inner = ap.fractional_pgd(0.1, 0.5, 0, hurst=0.3)
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
    make = lambda: ap.anti_pgd(0.1, 0.5, 0, correlation=0.5, store_noise=store_noise)  # noqa: E731
    opt = optax.apply_if_finite(make(), max_consecutive_errors=3)
    clean = make()
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


def test_noise_std_and_correlation_can_be_traced_and_vmapped():
    params = jnp.zeros(100_000)

    def perturbation(noise_std, correlation):
        transform = ap.add_anticorrelated_noise(noise_std, 0, correlation=correlation)
        state = transform.init(params)
        first, state = transform.update(jnp.zeros_like(params), state)
        second, _ = transform.update(jnp.zeros_like(params), state)
        return first, second

    stds = jnp.array([0.0, 0.1, 1.0])
    correlations = jnp.array([1.0, 0.5, 0.0])
    first, second = jax.jit(jax.vmap(perturbation))(stds, correlations)
    assert float(jnp.abs(first[0]).max()) == 0.0
    for i in (1, 2):
        c = float(correlations[i])
        variance = float(stds[i]) ** 2 * (1 + c**2)
        # 5 standard errors of a variance (resp. correlation) from 100k samples.
        assert abs(float(jnp.var(first[i])) / variance - 1) < 0.023
        rho = np.corrcoef(first[i], second[i])[0, 1]
        assert abs(rho + c / (1 + c**2)) < 0.016
        # The same numbers as a transform built outside vmap.
        np.testing.assert_allclose(
            first[i], perturbation(float(stds[i]), c)[0], rtol=0, atol=1e-6
        )


# ------------------------------------------------------------ bad input

FACTORIES = {
    "independent": ap.add_independent_noise,
    "anticorrelated": ap.add_anticorrelated_noise,
    "correlated": functools.partial(ap.add_correlated_noise, coefficients=(1.0, -1.0)),
    "fractional": functools.partial(ap.add_fractional_noise, hurst=0.3),
}


@pytest.mark.parametrize("bad", [-0.1, float("nan"), np.float32(-1.0)])
@pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES)
def test_negative_or_nan_noise_std_is_rejected(factory, bad):
    with pytest.raises(ValueError, match="noise_std"):
        factory(bad, 0)


@pytest.mark.parametrize("bad", ["0.1", None, jnp.ones(3)])
def test_noise_std_of_the_wrong_kind_is_rejected(bad):
    with pytest.raises((TypeError, ValueError), match="noise_std"):
        ap.add_anticorrelated_noise(bad, 0)


@pytest.mark.parametrize("factory", FACTORIES.values(), ids=FACTORIES)
def test_unknown_distribution_or_leaves_is_rejected(factory):
    with pytest.raises(ValueError, match="distribution"):
        factory(0.1, 0, distribution="uniform")
    with pytest.raises(ValueError, match="leaves"):
        factory(0.1, 0, leaves="random")


@pytest.mark.parametrize("correlation", [-0.1, 1.5, float("nan"), 2])
def test_correlation_outside_zero_one_is_rejected(correlation):
    with pytest.raises(ValueError, match="correlation"):
        ap.add_anticorrelated_noise(0.1, 0, correlation=correlation)
    with pytest.raises(ValueError, match="correlation"):
        ap.anti_pgd(0.1, 0.1, 0, correlation=correlation)


@pytest.mark.parametrize(
    "coefficients",
    [(), [[1.0, -1.0]], (1.0, float("nan")), (1.0, float("inf")), ("a", "b")],
    ids=["empty", "2d", "nan", "inf", "strings"],
)
def test_bad_coefficients_are_rejected(coefficients):
    with pytest.raises((ValueError, TypeError), match="coefficients"):
        ap.add_correlated_noise(0.1, 0, coefficients=coefficients)


def test_traced_hurst_is_refused_with_the_way_to_sweep_it():
    def build(hurst):
        return ap.add_fractional_noise(0.1, 0, hurst=hurst).init(jnp.zeros(3))

    with pytest.raises(TypeError, match="coefficients"):
        jax.jit(build)(0.3)
