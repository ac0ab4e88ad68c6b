"""Flax integration: NNX ``nnx.Optimizer`` and Linen ``TrainState``."""

import chex
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import train_state

import optax_antipgd as ap
from tests._law import past_draws

LEARNING_RATE = 0.05
NUM_STEPS = 40


def make_data():
    x = jax.random.normal(jax.random.key(1), (32, 4))
    y = jnp.sin(x @ jnp.array([[1.0], [-2.0], [0.5], [1.5]]))
    return x, y


class NnxMLP(nnx.Module):
    """With a BatchNorm: its batch statistics are not ``nnx.Param``s."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def nnx_loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def make_tx(store_noise=True, noise_std=0.05):
    return ap.anti_pgd(LEARNING_RATE, noise_std, key=3, store_noise=store_noise)


def make_nnx(tx, seed=0):
    model = NnxMLP(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def nnx_train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(nnx_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss, grads


def nnx_train(model, optimizer, num_steps):
    x, y = make_data()
    return [float(nnx_train_step(model, optimizer, x, y)[0]) for _ in range(num_steps)]


def params_of(model):
    return nnx.as_pure(nnx.state(model, nnx.Param))


def nnx_denoised(model, optimizer):
    """The documented spelling: the pure arrays the optax transform sees."""
    return ap.denoised_params(nnx.as_pure(optimizer.opt_state), params_of(model))


@pytest.mark.parametrize("store_noise", [True, False])
def test_nnx_optimizer_trains_under_nnx_jit(store_noise):
    model, optimizer = make_nnx(make_tx(store_noise))
    losses = nnx_train(model, optimizer, NUM_STEPS)
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(optimizer.step[...]) == NUM_STEPS
    noise_state = nnx.as_pure(optimizer.opt_state)[-1]
    assert isinstance(noise_state, ap.AnticorrelatedNoiseState)
    assert int(noise_state.count) == NUM_STEPS
    # wrt=nnx.Param: only the parameters carry noise, not the batch statistics.
    # Anti-PGD keeps one past draw, xi_{n-1}; store_noise=False keeps none.
    past = past_draws(noise_state)
    assert len(past) == (1 if store_noise else 0)
    for noise in past:
        chex.assert_trees_all_equal_shapes(noise, params_of(model))
    # The whole model state (batch statistics included) is not the tree init
    # saw: refused in both store modes, never answered with other noise.
    with pytest.raises(ValueError, match="not the tree"):
        ap.denoised_params(
            nnx.as_pure(optimizer.opt_state), nnx.as_pure(nnx.state(model))
        )

    # denoised_params on the NNX state: v_{n+1} = v_n - lr * grad L(w_n), plain
    # SGD with the gradient taken at the perturbed weights w_n.
    denoised = nnx_denoised(model, optimizer)
    _, grads = nnx_train_step(model, optimizer, *make_data())
    grads = nnx.as_pure(grads)
    expected = jax.tree.map(lambda v, g: v - LEARNING_RATE * g, denoised, grads)
    # Float32 rounding of w - lr * g + xi' - xi - xi' against v - lr * g.
    chex.assert_trees_all_close(nnx_denoised(model, optimizer), expected, atol=1e-6)
    # ... and the noisy weights are the noise (0.05 per element) away.
    noisy = params_of(model)
    assert optax.tree.norm(jax.tree.map(jnp.subtract, noisy, expected)) > 0.2


def test_nnx_fractional_pgd_keeps_a_ring_of_params_and_follows_its_law():
    # fractional_pgd stored: K = 8 taps, a ring of 7 params-like trees. One
    # step moves the weights by -lr * g + sum_j c_j xi_{n-j}; the filter's
    # coefficients sum to s != 0, so denoised_params (which subtracts the noise
    # in flight, sum_{j<K-1} D_j xi_{n-1-j}, D_j = c_0 + ... + c_j) moves by
    # -lr * g + s * xi_{n+1-K}: the oldest draw, the one leaving the state.
    # sigma = 0.01: the filter's sum s = 0.39 lets s * sigma random-walk the
    # weights, and 40 steps must still halve the loss (plain SGD: 0.45x).
    hurst, num_taps, noise_std = 0.25, 8, 0.01
    tx = ap.fractional_pgd(LEARNING_RATE, noise_std, key=3, hurst=hurst)
    model, optimizer = make_nnx(tx)
    losses = nnx_train(model, optimizer, NUM_STEPS)
    assert losses[-1] < 0.5 * losses[0], losses
    noise_state = nnx.as_pure(optimizer.opt_state)[-1]
    assert isinstance(noise_state, ap.CorrelatedNoiseState)
    assert int(noise_state.count) == NUM_STEPS
    ring_before = past_draws(noise_state)  # xi_{n-1}, ..., xi_{n-7}
    assert len(ring_before) == num_taps - 1
    for noise in ring_before:
        chex.assert_trees_all_equal_shapes_and_dtypes(noise, params_of(model))
    coefficients = ap.fractional_coefficients(hurst, num_taps)
    np.testing.assert_array_equal(
        noise_state.coefficients, coefficients.astype(np.float32)
    )

    before = params_of(model)
    denoised = nnx_denoised(model, optimizer)
    _, grads = nnx_train_step(model, optimizer, *make_data())
    grads = nnx.as_pure(grads)
    ring_after = past_draws(nnx.as_pure(optimizer.opt_state)[-1])
    # At n = NUM_STEPS the update drew xi_n; the state keeps it and the draws
    # before it, and xi_{n-7} (the oldest) leaves the filter.
    for lag in range(1, num_taps - 1):
        chex.assert_trees_all_equal(ring_after[lag], ring_before[lag - 1])
    # A fresh draw: xi_n - xi_{n-1} has norm sigma * sqrt(2 * size).
    size = sum(leaf.size for leaf in jax.tree.leaves(before))
    fresh = jax.tree.map(jnp.subtract, ring_after[0], ring_before[0])
    assert optax.tree.norm(fresh) > 0.5 * noise_std * np.sqrt(2 * size)
    # xi_{n-j} for j = 0 .. 7: the new draw, then xi_{n-1}, ..., xi_{n-7}.
    draws = [ring_after[0], *ring_before]
    noise = jax.tree.map(
        lambda *xs: sum(float(c) * x for c, x in zip(coefficients, xs, strict=True)),
        *draws,
    )
    expected = jax.tree.map(
        lambda w, g, p: w - LEARNING_RATE * g + p, before, grads, noise
    )
    # Float32 rounding of the filter's 8 terms and of the update.
    chex.assert_trees_all_close(params_of(model), expected, atol=1e-6)
    oldest = ring_before[-1]
    expected = jax.tree.map(
        lambda v, g, x: v - LEARNING_RATE * g + float(coefficients.sum()) * x,
        denoised,
        grads,
        oldest,
    )
    chex.assert_trees_all_close(nnx_denoised(model, optimizer), expected, atol=1e-6)


def test_nnx_store_modes_agree():
    params = {}
    for store_noise in (True, False):
        model, optimizer = make_nnx(make_tx(store_noise))
        nnx_train(model, optimizer, 3)
        params[store_noise] = params_of(model)
    chex.assert_trees_all_close(params[True], params[False], atol=1e-6)


@pytest.mark.parametrize("store_noise", [True, False])
def test_nnx_state_checkpoints_with_orbax(tmp_path, store_noise):
    tx = make_tx(store_noise)
    model, optimizer = make_nnx(tx)
    nnx_train(model, optimizer, 3)
    saved = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", saved)
        checkpointer.wait_until_finished()
    nnx_train(model, optimizer, 3)
    uninterrupted = nnx.as_pure(nnx.state((model, optimizer)))

    abstract_model, abstract_optimizer = nnx.eval_shape(lambda: make_nnx(tx))
    target = {
        "model": nnx.state(abstract_model),
        "optimizer": nnx.state(abstract_optimizer),
    }
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "state", target)
    # A model and optimizer built afresh (another seed: every value must come
    # from the checkpoint), then updated in place from the restored state.
    model, optimizer = make_nnx(tx, seed=1)
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    assert int(optimizer.step[...]) == 3
    nnx_train(model, optimizer, 3)
    resumed = nnx.as_pure(nnx.state((model, optimizer)))
    chex.assert_trees_all_equal(resumed, uninterrupted)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(16)(x)))


@jax.jit
def linen_train_step(state, x, y):
    def loss_fn(params):
        return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss, grads


def make_linen_state(store_noise):
    model = LinenMLP()
    x, _ = make_data()
    params = model.init(jax.random.key(0), x)["params"]
    tx = ap.anti_pgd(LEARNING_RATE, 0.01, key=4, store_noise=store_noise)
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@pytest.mark.parametrize("store_noise", [True, False])
def test_linen_train_state_trains_under_jit(store_noise):
    state = make_linen_state(store_noise)
    x, y = make_data()
    losses = []
    for _ in range(NUM_STEPS):
        denoised = ap.denoised_params(state.opt_state, state.params)
        state, loss, grads = linen_train_step(state, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == NUM_STEPS
    # The last step moved the noise-free iterate by -lr * grad, as in SGD.
    expected = jax.tree.map(lambda v, g: v - LEARNING_RATE * g, denoised, grads)
    chex.assert_trees_all_close(
        ap.denoised_params(state.opt_state, state.params), expected, atol=1e-6
    )
    # Linen's variables dict is not the tree init saw: refused in both modes.
    with pytest.raises(ValueError, match="not the tree"):
        ap.denoised_params(state.opt_state, {"params": state.params})

    # flax.serialization of the whole TrainState, into a fresh one.
    restored = flax.serialization.from_bytes(
        make_linen_state(store_noise), flax.serialization.to_bytes(state)
    )
    restored = jax.tree.map(jnp.asarray, restored)
    assert int(restored.step) == NUM_STEPS
    next_restored, loss_restored, _ = linen_train_step(restored, x, y)
    next_state, loss, _ = linen_train_step(state, x, y)
    chex.assert_trees_all_equal(
        (next_restored.params, next_restored.opt_state, loss_restored),
        (next_state.params, next_state.opt_state, loss),
    )
