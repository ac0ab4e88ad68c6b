"""The noise family swept in one compiled loop: correlation, Hurst exponent.

The optimizer is built *inside* ``jax.vmap``: ``correlation`` (Anti-PGD's
``xi_{n+1} - c xi_n``) and the fractional filter's coefficients are traced
values, so one ``jit`` trains every (setting, seed) pair on the paper's sparse
regression (``w = v * v`` from ``v = 1``) and reports the test error
``|v * v - w*|^2`` and ``Tr H`` at the end, after a clean phase. ``hurst`` is
turned into coefficients with ``fractional_coefficients`` (computed in
float64, outside the trace) and passed to ``add_correlated_noise``.

    python examples/correlation_sweep.py [--quick]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_antipgd as ap

DIM, NUM_TRAIN, SPARSITY = 100, 40, 5
LEARNING_RATE, NOISE_STD = 0.02, 0.05
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

    def sigma(count):
        return jnp.where(count < noisy_steps, NOISE_STD, 0.0)

    def run(noise, seed):
        opt = optax.chain(optax.sgd(LEARNING_RATE), noise(jax.random.key(seed)))
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

    def by_correlation(correlation, seed):
        return run(
            lambda key: ap.add_anticorrelated_noise(
                sigma, key, correlation=correlation
            ),
            seed,
        )

    def by_filter(coefficients, seed):
        return run(
            lambda key: ap.add_correlated_noise(sigma, key, coefficients=coefficients),
            seed,
        )

    grid = lambda f: jax.vmap(jax.vmap(f, (None, 0)), (0, None))  # noqa: E731
    filters = np.stack([ap.fractional_coefficients(h, NUM_TAPS) for h in HURSTS])

    @jax.jit
    def sweep(correlations, filters, seeds):
        return grid(by_correlation)(correlations, seeds), grid(by_filter)(
            filters, seeds
        )

    (c_error, c_trace), (h_error, h_trace) = jax.device_get(
        sweep(jnp.asarray(CORRELATIONS), jnp.asarray(filters, jnp.float32), seeds)
    )
    print(
        f"sparse regression, sigma {NOISE_STD}, {noisy_steps} noisy + {clean_steps} "
        f"clean steps; mean +- std over {len(seeds)} seeds\n"
    )
    rows = [
        (f"Anti-PGD, correlation {c:g}", i, c_error, c_trace)
        for i, c in enumerate(CORRELATIONS)
    ]
    rows += [
        (f"fractional, hurst {h:g}", i, h_error, h_trace) for i, h in enumerate(HURSTS)
    ]
    print("| noise | test error | Tr H |\n|---|---|---|")
    for name, i, error, trace in rows:
        print(
            f"| {name} | {error[i].mean():.3g} ± {error[i].std():.2g} "
            f"| {trace[i].mean():.3g} ± {trace[i].std():.2g} |"
        )


if __name__ == "__main__":
    main()
