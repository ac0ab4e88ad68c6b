"""Anti-PGD with Flax Linen: ``TrainState.create(..., tx=ap.anti_pgd(...))``.

Fits a small tanh network to a noisy sine with full-batch Anti-PGD, the
optimizer held by a ``flax.training.train_state.TrainState``, and reports the
test error of the noise-free iterate given by ``ap.denoised_params``.

    python examples/flax_linen.py [--quick]
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.training import train_state

import optax_antipgd as ap


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(1)(jnp.tanh(nn.Dense(32)(x)))


def make_data(key: jax.Array, num: int):
    x_key, noise_key = jax.random.split(key)
    x = jax.random.uniform(x_key, (num, 1), minval=-3.0, maxval=3.0)
    return x, jnp.sin(x) + 0.1 * jax.random.normal(noise_key, (num, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    num_steps = 200 if args.quick else 5_000

    x_train, y_train = make_data(jax.random.key(0), 64)
    x_test = jnp.linspace(-3.0, 3.0, 200).reshape(-1, 1)
    model = MLP()
    state = train_state.TrainState.create(
        apply_fn=model.apply,
        params=model.init(jax.random.key(1), x_train)["params"],
        tx=ap.anti_pgd(learning_rate=0.05, noise_std=0.01, key=2),
    )

    @jax.jit
    def train_step(state: train_state.TrainState) -> train_state.TrainState:
        def loss_fn(params):
            prediction = state.apply_fn({"params": params}, x_train)
            return jnp.mean((prediction - y_train) ** 2)

        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    @jax.jit
    def test_error(params) -> jax.Array:
        prediction = model.apply({"params": params}, x_test)
        return jnp.mean((prediction - jnp.sin(x_test)) ** 2)

    for _ in range(num_steps):
        state = train_step(state)
    clean = ap.denoised_params(state.opt_state, state.params)
    print(f"steps: {int(state.step)}")
    for name, params in (("noisy weights w_n", state.params), ("denoised", clean)):
        print(f"test MSE to sin(x), {name}: {float(test_error(params)):.4f}")


if __name__ == "__main__":
    main()
