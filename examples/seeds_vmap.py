"""A research loop: seeds and noise settings trained at once, in one ``jit``.

The optimizer is built *inside* ``jax.vmap``: its key, its ``noise_std``, the
anticorrelation ``c`` of ``xi_{n+1} - c xi_n`` and a fractional filter's
coefficients are traced values, so one compiled call trains every (setting,
seed) pair on the paper's sparse regression (``w = v * v``, from ``v = 1``)
and reports the test error ``|v * v - w*|^2`` at the end, after a clean phase,
and ``Tr H``. Three sweeps: ``noise_std`` for PGD and Anti-PGD, ``correlation``
for Anti-PGD, and ``hurst`` for fractional noise (turned into coefficients by
``fractional_coefficients``, in float64 outside the trace, and passed to
``add_correlated_noise``).

    python examples/seeds_vmap.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_antipgd as ap

DIM, NUM_TRAIN, SPARSITY, LEARNING_RATE = 100, 40, 5, 0.02
NOISE_STDS = (0.0, 0.02, 0.05)
NOISE_STD = 0.05  # of the correlation and Hurst sweeps
CORRELATIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
HURSTS = (0.1, 0.25, 0.4, 0.5)
NUM_TAPS = 8


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
    seeds = jnp.arange(2 if args.quick else 4)
    x, y, w_star = make_problem()

    def loss(v):
        return jnp.sum((x @ (v * v) - y) ** 2) / (4 * NUM_TRAIN)

    def run(make_noise, noise_std, seed):
        # noise_std, seed (and what make_noise closes over) are tracers here.
        schedule = lambda count: jnp.where(count < noisy_steps, noise_std, 0.0)  # noqa: E731
        opt = optax.chain(
            optax.sgd(LEARNING_RATE), make_noise(schedule, jax.random.key(seed))
        )
        v = jnp.ones(DIM)

        def step(carry, _):
            v, state = carry
            updates, state = opt.update(jax.grad(loss)(v), state, v)
            return (optax.apply_updates(v, updates), state), None

        (v, _), _ = jax.lax.scan(
            step, (v, opt.init(v)), length=noisy_steps + clean_steps
        )
        trace = ap.hessian_trace(loss, v, 0, num_samples=32)
        return jnp.sum((v * v - w_star) ** 2), trace

    def grid(f, settings, seeds):
        """``f(setting, seed)`` on every pair: [setting, seed]."""
        return jax.vmap(jax.vmap(f, (None, 0)), (0, None))(settings, seeds)

    @jax.jit
    def sweep(noise_stds, correlations, filters, seeds):
        return {
            "PGD, sigma": grid(
                lambda s, seed: run(ap.add_independent_noise, s, seed),
                noise_stds,
                seeds,
            ),
            "Anti-PGD, sigma": grid(
                lambda s, seed: run(ap.add_anticorrelated_noise, s, seed),
                noise_stds,
                seeds,
            ),
            "Anti-PGD, correlation": grid(
                lambda c, seed: run(
                    lambda std, key: ap.add_anticorrelated_noise(
                        std, key, correlation=c
                    ),
                    NOISE_STD,
                    seed,
                ),
                correlations,
                seeds,
            ),
            "fractional, hurst": grid(
                lambda coefficients, seed: run(
                    lambda std, key: ap.add_correlated_noise(
                        std, key, coefficients=coefficients
                    ),
                    NOISE_STD,
                    seed,
                ),
                filters,
                seeds,
            ),
        }

    filters = np.stack([ap.fractional_coefficients(h, NUM_TAPS) for h in HURSTS])
    results = jax.device_get(
        sweep(
            jnp.asarray(NOISE_STDS),
            jnp.asarray(CORRELATIONS),
            jnp.asarray(filters, jnp.float32),
            seeds,
        )
    )
    settings = {
        "PGD, sigma": NOISE_STDS,
        "Anti-PGD, sigma": NOISE_STDS,
        "Anti-PGD, correlation": CORRELATIONS,
        "fractional, hurst": HURSTS,
    }
    print(
        f"sparse regression, {noisy_steps} noisy + {clean_steps} clean steps "
        f"(sigma {NOISE_STD} unless swept; sigma = 0 is plain GD); "
        f"mean ± std over {len(seeds)} seeds\n"
    )
    print("| noise | test error | Tr H |\n|---|---|---|")
    for name, values in settings.items():
        errors, traces = results[name]
        for i, value in enumerate(values):
            print(
                f"| {name} {value:g} | {errors[i].mean():.3g} ± {errors[i].std():.2g} "
                f"| {traces[i].mean():.3g} ± {traces[i].std():.2g} |"
            )


if __name__ == "__main__":
    main()
