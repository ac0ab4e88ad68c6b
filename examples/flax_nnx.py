"""Anti-PGD with Flax NNX: ``nnx.Optimizer`` and evaluation on the clean iterate.

Trains a small tanh MLP on scikit-learn's digits (bundled, no download) with
``nnx.Optimizer(model, ap.anti_pgd(...), wrt=nnx.Param)``, then evaluates both
the noisy weights ``w_n`` and the noise-free iterate ``w_n - xi_n`` given by
``ap.denoised_params``.

    python examples/flax_nnx.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.datasets import load_digits

import optax_antipgd as ap


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 64, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def load_data(num_train: int):
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(labels))
    images, labels = images[order].astype(np.float32), labels[order]
    mean, std = images[:num_train].mean(0), images[:num_train].std(0)
    images = (images - mean) / np.where(std > 0, std, 1.0)
    return (
        (jnp.asarray(images[:num_train]), jnp.asarray(labels[:num_train])),
        (jnp.asarray(images[num_train:]), jnp.asarray(labels[num_train:])),
    )


def loss_fn(model: MLP, x: jax.Array, labels: jax.Array) -> jax.Array:
    # Squared error on one-hot targets, as in the paper's digits experiment.
    return 0.5 * jnp.mean(jnp.sum((model(x) - jax.nn.one_hot(labels, 10)) ** 2, -1))


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, labels) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model: MLP, x, labels) -> jax.Array:
    return 100 * jnp.mean(jnp.argmax(model(x), -1) == labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    num_steps = 100 if args.quick else 2_000

    (x_train, y_train), (x_test, y_test) = load_data(num_train=400)
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, ap.anti_pgd(learning_rate=0.2, noise_std=0.01, key=0), wrt=nnx.Param
    )
    for _ in range(num_steps):
        loss = train_step(model, optimizer, x_train, y_train)
    print(f"steps: {num_steps}, last training loss: {float(loss):.4f}")

    # The noise-free iterate w_n - xi_n, evaluated on a copy of the model.
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    clean = ap.denoised_params(nnx.as_pure(optimizer.opt_state), params)
    clean_model = nnx.clone(model)
    nnx.update(clean_model, clean)
    for name, m in (("noisy weights w_n", model), ("denoised w_n - xi_n", clean_model)):
        print(f"test accuracy, {name}: {float(accuracy(m, x_test, y_test)):.1f}%")


if __name__ == "__main__":
    main()
