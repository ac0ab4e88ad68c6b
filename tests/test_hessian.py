"""Tests of hessian_trace: Hutchinson's estimate of Tr(Hessian)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import optax_antipgd as ap


def _hutchinson_std(hessian: np.ndarray, num_samples: int) -> float:
    """Standard deviation of the Rademacher estimate: 2(|H|_F^2 - sum H_ii^2)/S."""
    off_diagonal = np.sum(hessian**2) - np.sum(np.diag(hessian) ** 2)
    return float(np.sqrt(2.0 * off_diagonal / num_samples))


def _dense_hessian(fn, params) -> np.ndarray:
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda x: fn(unravel(x)))(flat), np.float64)


def _valley(params):
    return 0.5 * params["v"] ** 2 * jnp.sum(params["u"] ** 2)


def _mlp_loss(params):
    x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)


def _mlp_params():
    k1, k2 = jax.random.split(jax.random.key(3))
    return {
        "w1": jax.random.normal(k1, (3, 6)),
        "b1": jnp.full((1, 6), 0.1),
        "w2": jax.random.normal(k2, (6, 1)) / 2,
        "b2": jnp.zeros((1, 1)),
    }


@pytest.mark.parametrize("dim", [5, 50])
def test_trace_within_5_percent_on_random_quadratics(dim):
    root = jax.random.normal(jax.random.key(dim), (dim, dim)) / np.sqrt(dim)
    matrix = root @ root.T + 0.5 * jnp.eye(dim)

    def quadratic(x):
        return 0.5 * x @ matrix @ x

    num_samples = 4096
    exact = float(jnp.trace(matrix))
    # 5% is a tolerance of at least 5 standard deviations of the estimator.
    assert 5 * _hutchinson_std(np.asarray(matrix), num_samples) < 0.05 * exact
    estimate = ap.hessian_trace(quadratic, jnp.ones(dim), 0, num_samples=num_samples)
    np.testing.assert_allclose(estimate, exact, rtol=0.05)


@pytest.mark.parametrize(("u_sq", "v"), [(100.0, 0.5), (4.0, 2.0), (400.0, 0.01)])
def test_trace_within_5_percent_on_widening_valley(u_sq, v):
    dim = 200
    params = {
        "u": jnp.full((dim,), np.sqrt(u_sq / dim), jnp.float32),
        "v": jnp.asarray(v, jnp.float32),
    }
    exact = dim * v**2 + u_sq
    num_samples = 1024
    assert 5 * _hutchinson_std(_dense_hessian(_valley, params), num_samples) < (
        0.05 * exact
    )
    estimate = ap.hessian_trace(_valley, params, 1, num_samples=num_samples)
    np.testing.assert_allclose(estimate, exact, rtol=0.05)


def test_trace_is_exact_for_a_diagonal_hessian():
    # Rademacher probes square to one: no variance when H is diagonal.
    curvature = jnp.arange(1.0, 11.0)
    estimate = ap.hessian_trace(
        lambda x: 0.5 * jnp.sum(curvature * x**2), jnp.zeros(10), 0, num_samples=1
    )
    np.testing.assert_allclose(estimate, 55.0, rtol=1e-6)


def test_trace_agrees_with_dense_hessian_on_mlp():
    params = _mlp_params()
    hessian = _dense_hessian(_mlp_loss, params)
    exact = np.trace(hessian)
    num_samples = 4096
    std = _hutchinson_std(hessian, num_samples)
    estimate = ap.hessian_trace(_mlp_loss, params, 2, num_samples=num_samples)
    assert abs(float(estimate) - exact) < 5 * std
    # The bound is tight: the estimator's spread is a few percent of the trace.
    assert 5 * std < 0.1 * abs(exact)


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_batch_size_gives_the_same_result_as_unbatched(batch_size):
    params = _mlp_params()
    unbatched = ap.hessian_trace(_mlp_loss, params, 5, num_samples=64)
    batched = ap.hessian_trace(
        _mlp_loss, params, 5, num_samples=64, batch_size=batch_size
    )
    np.testing.assert_allclose(batched, unbatched, rtol=1e-5)


def test_jit_with_traced_params_and_key():
    params = _mlp_params()
    eager = ap.hessian_trace(_mlp_loss, params, jax.random.key(4), num_samples=32)
    jitted = jax.jit(
        lambda p, k: ap.hessian_trace(_mlp_loss, p, k, num_samples=32, batch_size=8)
    )(params, jax.random.key(4))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)


@pytest.mark.parametrize(
    "key", [7, jax.random.PRNGKey(7), jax.random.key(7), jnp.asarray(7)]
)
def test_key_forms_give_the_same_estimate(key):
    params = _mlp_params()
    reference = ap.hessian_trace(_mlp_loss, params, jax.random.key(7), num_samples=8)
    estimate = ap.hessian_trace(_mlp_loss, params, key, num_samples=8)
    np.testing.assert_allclose(estimate, reference, rtol=1e-6)


def test_int_leaves_are_held_constant():
    params = {"x": jnp.zeros(3), "step": jnp.asarray(2, jnp.int32)}
    estimate = ap.hessian_trace(
        lambda p: p["step"] * jnp.sum(p["x"] ** 2), params, 0, num_samples=2
    )
    np.testing.assert_allclose(estimate, 12.0, rtol=1e-6)


@pytest.mark.parametrize("num_samples", [0, -3])
def test_num_samples_below_one_raises_value_error(num_samples):
    with pytest.raises(ValueError, match="num_samples"):
        ap.hessian_trace(
            _valley, {"u": jnp.ones(2), "v": 1.0}, 0, num_samples=num_samples
        )


@pytest.mark.parametrize("num_samples", [2.0, True, "4"])
def test_num_samples_not_int_raises_type_error(num_samples):
    with pytest.raises(TypeError, match="num_samples"):
        ap.hessian_trace(jnp.sum, jnp.ones(2), 0, num_samples=num_samples)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_bad_batch_size_raises_value_error(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        ap.hessian_trace(jnp.sum, jnp.ones(2), 0, batch_size=batch_size)


def test_batch_size_not_int_raises_type_error():
    with pytest.raises(TypeError, match="batch_size"):
        ap.hessian_trace(jnp.sum, jnp.ones(2), 0, batch_size=2.5)


@pytest.mark.parametrize(
    "fn", [lambda x: x**2, lambda x: (x.sum(), x.sum()), lambda x: jnp.sum(x > 0)]
)
def test_non_scalar_fn_raises_type_error_naming_fn(fn):
    with pytest.raises(TypeError, match="fn must return a real scalar"):
        ap.hessian_trace(fn, jnp.ones(3), 0)


def test_bad_key_raises_type_error():
    with pytest.raises(TypeError, match="key"):
        ap.hessian_trace(jnp.sum, jnp.ones(3), "seed")
