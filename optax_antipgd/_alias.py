"""PGD and Anti-PGD: SGD followed by parameter-space noise."""

from typing import Any

import jax
import optax

from optax_antipgd import _noise


def pgd(
    learning_rate: optax.ScalarOrSchedule,
    noise_std: optax.ScalarOrSchedule,
    key: Any,
    *,
    momentum: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    distribution: str = "gaussian",
) -> optax.GradientTransformationExtraArgs:
    r"""Perturbed gradient descent: :math:`w_{n+1} = w_n - \eta g_n + \xi_n`.

    ``optax.chain(optax.sgd(...), add_independent_noise(...))``: the noise
    lands in parameter space, unscaled by the learning rate, as in the paper.
    To scale it by the learning rate instead (the convention of Keras-style
    code), chain the noise before the optimizer::

        optax.chain(ap.add_independent_noise(noise_std, key), optax.sgd(lr))

    Args:
      learning_rate: The learning rate :math:`\eta`, a float or a schedule.
      noise_std: The standard deviation :math:`\sigma` of :math:`\xi`, a float
        or a schedule.
      key: The noise's key, see :func:`add_independent_noise`.
      momentum: Momentum of :func:`optax.sgd`; ``None`` for none.
      nesterov: Whether :func:`optax.sgd` uses Nesterov momentum.
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
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
        _noise.add_independent_noise(noise_std, key, distribution=distribution),
    )


def anti_pgd(
    learning_rate: optax.ScalarOrSchedule,
    noise_std: optax.ScalarOrSchedule,
    key: Any,
    *,
    momentum: jax.typing.ArrayLike | None = None,
    nesterov: bool = False,
    distribution: str = "gaussian",
    store_noise: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Anti-PGD: :math:`w_{n+1} = w_n - \eta g_n + \xi_{n+1} - \xi_n`.

    ``optax.chain(optax.sgd(...), add_anticorrelated_noise(...))``: the noise
    lands in parameter space, unscaled by the learning rate, as in the paper.
    To scale it by the learning rate instead (the convention of Keras-style
    code), chain the noise before the optimizer::

        optax.chain(ap.add_anticorrelated_noise(noise_std, key), optax.sgd(lr))

    Evaluate on :func:`denoised_params` to see the noise-free iterate.

    Args:
      learning_rate: The learning rate :math:`\eta`, a float or a schedule.
      noise_std: The standard deviation :math:`\sigma` of :math:`\xi`, a float
        or a schedule.
      key: The noise's key, see :func:`add_anticorrelated_noise`.
      momentum: Momentum of :func:`optax.sgd`; ``None`` for none.
      nesterov: Whether :func:`optax.sgd` uses Nesterov momentum.
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
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
        _noise.add_anticorrelated_noise(
            noise_std, key, distribution=distribution, store_noise=store_noise
        ),
    )
