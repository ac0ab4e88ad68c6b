"""PGD, Anti-PGD and fractional PGD: SGD followed by parameter-space noise."""

from typing import Any

import jax
import optax

from optax_antipgd import _keys
from optax_antipgd import _noise


def _sgd(learning_rate, momentum, nesterov, accumulator_dtype):
    return optax.sgd(
        learning_rate,
        momentum=momentum,
        nesterov=nesterov,
        accumulator_dtype=accumulator_dtype,
    )


def pgd(
    learning_rate: optax.ScalarOrSchedule,
    noise_std: optax.ScalarOrSchedule,
    key: _keys.Key,
    *,
    momentum: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any | None = None,
    leaves: _noise.Leaves = "all",
    distribution: _noise.Distribution = "gaussian",
) -> optax.GradientTransformationExtraArgs:
    r"""Perturbed gradient descent: :math:`w_{n+1} = w_n - \eta g_n + \xi_n`.

    ``optax.chain(optax.sgd(...), add_independent_noise(...))``: the noise
    lands in parameter space, unscaled by the learning rate, as in the paper.

    Args:
      learning_rate: The learning rate :math:`\eta`, a float or a schedule.
      noise_std: The standard deviation :math:`\sigma` of :math:`\xi`, a float
        or a schedule.
      key: The noise's key, see :func:`add_independent_noise`.
      momentum: Momentum of :func:`optax.sgd`; ``None`` for none.
      nesterov: Whether :func:`optax.sgd` uses Nesterov momentum.
      accumulator_dtype: The dtype of :func:`optax.sgd`'s momentum.
      leaves: ``"all"`` or ``"cyclic"`` (one float leaf per step, in turn).
      distribution: ``"gaussian"`` or ``"rademacher"``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_antipgd as ap
      >>> opt = ap.pgd(learning_rate=0.1, noise_std=0.01, key=0)
      >>> params = jnp.ones(3)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(params, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Orvieto et al, `Anticorrelated Noise Injection for Improved
      Generalization <https://arxiv.org/abs/2202.02831>`_, 2022
    """
    return optax.chain(
        _sgd(learning_rate, momentum, nesterov, accumulator_dtype),
        _noise.add_independent_noise(
            noise_std, key, leaves=leaves, distribution=distribution
        ),
    )


def anti_pgd(
    learning_rate: optax.ScalarOrSchedule,
    noise_std: optax.ScalarOrSchedule,
    key: _keys.Key,
    *,
    momentum: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any | None = None,
    correlation: jax.typing.ArrayLike = 1.0,
    leaves: _noise.Leaves = "all",
    distribution: _noise.Distribution = "gaussian",
    store_noise: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Anti-PGD: :math:`w_{n+1} = w_n - \eta g_n + \xi_n - c\,\xi_{n-1}`.

    ``optax.chain(optax.sgd(...), add_anticorrelated_noise(...))``: the noise
    lands in parameter space, unscaled by the learning rate, as in the paper.
    Evaluate on :func:`denoised_params` to see the noise-free iterate.

    Args:
      learning_rate: The learning rate :math:`\eta`, a float or a schedule.
      noise_std: The standard deviation :math:`\sigma` of :math:`\xi`, a float
        or a schedule.
      key: The noise's key, see :func:`add_anticorrelated_noise`.
      momentum: Momentum of :func:`optax.sgd`; ``None`` for none.
      nesterov: Whether :func:`optax.sgd` uses Nesterov momentum.
      accumulator_dtype: The dtype of :func:`optax.sgd`'s momentum.
      correlation: :math:`c \in [0, 1]`; 1 (the default) is Anti-PGD.
      leaves: ``"all"`` or ``"cyclic"`` (one float leaf per step, in turn).
      distribution: ``"gaussian"`` or ``"rademacher"``.
      store_noise: Whether the state stores :math:`\xi_n` or regenerates it.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_antipgd as ap
      >>> loss = lambda w: 0.5 * jnp.sum(w**2)
      >>> opt = ap.anti_pgd(learning_rate=0.1, noise_std=0.01, key=0)
      >>> params = jnp.ones(3)
      >>> state = opt.init(params)
      >>> for _ in range(100):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> # Near the minimum, the noise-free iterate sits closer than the noisy one.
      >>> bool(loss(ap.denoised_params(state, params)) < loss(params) < 1e-3)
      True

    References:
      Orvieto et al, `Anticorrelated Noise Injection for Improved
      Generalization <https://arxiv.org/abs/2202.02831>`_, 2022
    """
    return optax.chain(
        _sgd(learning_rate, momentum, nesterov, accumulator_dtype),
        _noise.add_anticorrelated_noise(
            noise_std,
            key,
            correlation=correlation,
            leaves=leaves,
            distribution=distribution,
            store_noise=store_noise,
        ),
    )


def fractional_pgd(
    learning_rate: optax.ScalarOrSchedule,
    noise_std: optax.ScalarOrSchedule,
    key: _keys.Key,
    *,
    hurst: float,
    num_taps: int = 8,
    momentum: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any | None = None,
    leaves: _noise.Leaves = "all",
    distribution: _noise.Distribution = "gaussian",
    store_noise: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Fractional PGD: gradient descent perturbed by fractional noise.

    :math:`w_{n+1} = w_n - \eta g_n + \sum_{j<K} c_j \xi_{n-j}` with the
    filter of fractional Gaussian noise (:func:`fractional_coefficients`):
    ``optax.chain(optax.sgd(...), add_fractional_noise(...))``, the noise in
    parameter space.

    Args:
      learning_rate: The learning rate :math:`\eta`, a float or a schedule.
      noise_std: The standard deviation :math:`\sigma` of :math:`\xi`, a float
        or a schedule.
      key: The noise's key, see :func:`add_fractional_noise`.
      hurst: The Hurst exponent :math:`H \in (0, 1)`; 1/2 is PGD's law.
      num_taps: The filter length :math:`K \geq 1`.
      momentum: Momentum of :func:`optax.sgd`; ``None`` for none.
      nesterov: Whether :func:`optax.sgd` uses Nesterov momentum.
      accumulator_dtype: The dtype of :func:`optax.sgd`'s momentum.
      leaves: ``"all"`` or ``"cyclic"`` (one float leaf per step, in turn).
      distribution: ``"gaussian"`` or ``"rademacher"``.
      store_noise: Whether the state stores the past draws or regenerates them.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_antipgd as ap
      >>> opt = ap.fractional_pgd(learning_rate=0.1, noise_std=0.01, key=0, hurst=0.3)
      >>> params = jnp.ones(3)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(params, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Lucchi et al, `On the Theoretical Properties of Noise Correlation in
      Stochastic Optimization <https://arxiv.org/abs/2209.09162>`_, 2022
    """
    return optax.chain(
        _sgd(learning_rate, momentum, nesterov, accumulator_dtype),
        _noise.add_fractional_noise(
            noise_std,
            key,
            hurst=hurst,
            num_taps=num_taps,
            leaves=leaves,
            distribution=distribution,
            store_noise=store_noise,
        ),
    )
