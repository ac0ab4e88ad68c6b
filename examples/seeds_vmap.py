"""A research loop: seeds and a noise sweep trained at once, in one ``jit``.

The optimizer is built *inside* ``jax.vmap``: its key and its ``noise_std``
are traced values, so one compiled call trains every (noise level, seed) pair
of Anti-PGD and PGD on the paper's sparse regression (``w = v * v``, from
``v = 1``) and reports the test error ``|v * v - w*|^2`` per noise level.

    python examples/seeds_vmap.py [--quick]
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_antipgd as ap

DIM, NUM_TRAIN, SPARSITY, LEARNING_RATE = 100, 40, 5, 0.02


def make_problem():
    key = jax.random.key(1)
    x = jax.random.normal(key, (NUM_TRAIN, DIM))
    support = jax.random.permutation(jax.random.fold_in(key, 1), DIM)[:SPARSITY]
    w_star = jnp.zeros(DIM).at[support].set(1.0)
    return x, x @ w_star, w_star


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    noisy_steps, clean_steps = (2_000, 500) if args.quick else (40_000, 10_000)
    noise_stds = jnp.asarray([0.0, 0.02, 0.05])
    seeds = jnp.arange(4)
    x, y, w_star = make_problem()

    def loss(v):
        return jnp.sum((x @ (v * v) - y) ** 2) / (4 * NUM_TRAIN)

    def run(make_optimizer, noise_std, seed):
        # noise_std and seed are tracers here: the optimizer is built per run.
        schedule = lambda count: jnp.where(count < noisy_steps, noise_std, 0.0)  # noqa: E731
        opt = make_optimizer(LEARNING_RATE, schedule, jax.random.key(seed))
        v = jnp.ones(DIM)

        def step(carry, _):
            v, state = carry
            updates, state = opt.update(jax.grad(loss)(v), state, v)
            return (optax.apply_updates(v, updates), state), None

        (v, _), _ = jax.lax.scan(
            step, (v, opt.init(v)), length=noisy_steps + clean_steps
        )
        return jnp.sum((v * v - w_star) ** 2)

    @jax.jit
    def sweep(noise_stds, seeds):
        errors = {}
        for name, make_optimizer in (("PGD", ap.pgd), ("Anti-PGD", ap.anti_pgd)):
            over_seeds = jax.vmap(functools.partial(run, make_optimizer), (None, 0))
            errors[name] = jax.vmap(over_seeds, (0, None))(noise_stds, seeds)
        return errors

    errors = jax.device_get(sweep(noise_stds, seeds))
    print(f"test error |v*v - w*|^2 after {noisy_steps} noisy + {clean_steps} clean")
    print(f"steps, mean +- std over {len(seeds)} seeds (sigma = 0 is plain GD):\n")
    print("| sigma | PGD | Anti-PGD |\n|---|---|---|")
    for i, noise_std in enumerate(np.asarray(noise_stds)):
        cells = [
            f"{errors[n][i].mean():.3g} ± {errors[n][i].std():.2g}" for n in errors
        ]
        print(f"| {noise_std:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
