"""Correlation filters: the coefficients ``c_j`` of ``p_n = sum_j c_j xi_{n-j}``.

Every correlated transform emits a linear filter of the i.i.d. noise stream;
this module builds and checks the filters: Anti-PGD's ``(1, -c)`` and the
moving-average representation of fractional Gaussian noise.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The Wold coefficients are the limit of the Durbin-Levinson predictors of
# order n, whose error falls as 1/n; Richardson extrapolation from n and 2n
# cancels that term. With n = 2048 the coefficients are within 1e-5 of the
# limit for hurst in [0.01, 0.99] (measured against n = 8192 and 16384).
_LEVINSON_ORDER = 2048


def _is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def fgn_autocorrelation(hurst: float, lags: Any) -> np.ndarray:
    r"""Autocorrelation of fractional Gaussian noise at integer ``lags``.

    :math:`\rho(k) = \frac12 (|k+1|^{2H} - 2|k|^{2H} + |k-1|^{2H})`, in float64.
    """
    k = np.abs(np.asarray(lags, np.float64))
    two_h = 2.0 * hurst
    return 0.5 * ((k + 1) ** two_h - 2 * k**two_h + np.abs(k - 1) ** two_h)


def _wold(hurst: float, num_taps: int, order: int) -> np.ndarray:
    """First ``num_taps`` MA coefficients (``psi_0 = 1``) from an AR(order) fit."""
    gamma = fgn_autocorrelation(hurst, np.arange(order + 1))
    phi = np.zeros(order + 1)
    variance = gamma[0]
    for m in range(1, order + 1):  # Durbin-Levinson
        reflection = (gamma[m] - phi[1:m] @ gamma[m - 1 : 0 : -1]) / variance
        phi[1:m] -= reflection * phi[m - 1 : 0 : -1]
        phi[m] = reflection
        variance *= 1.0 - reflection**2
    psi = np.zeros(num_taps)
    psi[0] = 1.0
    for j in range(1, num_taps):  # psi = 1 / phi(z), the causal inverse
        psi[j] = phi[1 : j + 1] @ psi[j - 1 :: -1]
    return psi


@functools.lru_cache(maxsize=256)
def _fractional_coefficients(hurst: float, num_taps: int) -> np.ndarray:
    order = max(_LEVINSON_ORDER, 2 * num_taps)
    psi = 2 * _wold(hurst, num_taps, 2 * order) - _wold(hurst, num_taps, order)
    coefficients = psi / np.linalg.norm(psi)
    coefficients.setflags(write=False)
    return coefficients


def fractional_coefficients(hurst: float, num_taps: int = 8) -> np.ndarray:
    r"""The filter of fractional noise: fGn's moving-average coefficients.

    Fractional Gaussian noise (fGn) with Hurst exponent :math:`H` is the
    stationary sequence with autocorrelation

    .. math::

        \rho(k) = \tfrac12 \left(|k+1|^{2H} - 2|k|^{2H} + |k-1|^{2H}\right).

    Its Wold representation writes it as a causal moving average of white
    noise, :math:`p_n = \sum_{j \geq 0} \psi_j \xi_{n-j}`. This function
    returns the first ``num_taps`` coefficients :math:`\psi_j`, normalised to
    unit norm so that each filtered perturbation has the variance of one draw.
    :math:`H = 1/2` gives :math:`(1, 0, \ldots)` (white noise, PGD's law);
    :math:`H < 1/2` anticorrelated steps, tending to Anti-PGD's
    :math:`(1, -1)/\sqrt2` as :math:`H \to 0`; :math:`H > 1/2` positively
    correlated, long-memory steps.

    The coefficients are computed in float64 (Durbin-Levinson on the exact
    autocorrelation, extrapolated to infinite order) and cached. The
    truncation to ``num_taps`` is an approximation: the filtered sequence
    has the autocorrelation :math:`\sum_j c_j c_{j+k}` instead of
    :math:`\rho(k)`. The largest error over lags 1 to 64:

    ========  ======  ======  ======  ======  ======  ======
    hurst     2 taps  4 taps  8 taps  16      32      64
    ========  ======  ======  ======  ======  ======  ======
    0.05      0.0215  0.0076  0.0030  0.0012  0.0005  0.0002
    0.1       0.0332  0.0118  0.0048  0.0019  0.0008  0.0003
    0.25      0.0482  0.0159  0.0063  0.0029  0.0013  0.0006
    0.4       0.0370  0.0154  0.0066  0.0029  0.0013  0.0005
    0.5       0       0       0       0       0       0
    0.6       0.0712  0.0399  0.0228  0.0131  0.0075  0.0043
    0.75      0.2696  0.1882  0.1327  0.0938  0.0663  0.0469
    0.9       0.6301  0.5464  0.4752  0.4136  0.3600  0.3134
    ========  ======  ======  ======  ======  ======  ======

    For :math:`H \leq 1/2` eight taps match fGn to better than 0.01 at every
    lag; long memory (:math:`H > 1/2`) decays too slowly for a short filter
    (the correlations beyond ``num_taps`` lags are cut to 0).

    Args:
      hurst: The Hurst exponent :math:`H`, a float in :math:`(0, 1)`; it must
        be concrete (not traced). To sweep ``hurst`` inside ``jax.jit`` or
        ``jax.vmap``, stack the coefficients of each value and pass them to
        :func:`add_correlated_noise`, which accepts traced coefficients.
      num_taps: The number :math:`K \geq 1` of coefficients.

    Returns:
      A read-only float64 numpy array of shape ``(num_taps,)`` with unit norm.

    Raises:
      ValueError: If ``hurst`` is not in :math:`(0, 1)` or ``num_taps < 1``.
      TypeError: If ``hurst`` is traced or ``num_taps`` is not an int.

    Examples:
      >>> import numpy as np
      >>> import optax_antipgd as ap
      >>> np.round(ap.fractional_coefficients(0.25, num_taps=4), 3)
      array([ 0.934, -0.348, -0.072, -0.042])
      >>> ap.fractional_coefficients(0.5, num_taps=3)
      array([1., 0., 0.])

    References:
      Lucchi et al, `On the Theoretical Properties of Noise Correlation in
      Stochastic Optimization <https://arxiv.org/abs/2209.09162>`_, 2022
    """
    hurst = check_hurst(hurst)
    num_taps = check_num_taps(num_taps)
    return _fractional_coefficients(hurst, num_taps)


def autocorrelation_error(hurst: float, num_taps: int, max_lag: int = 64) -> float:
    """The largest |filter's autocorrelation - fGn's| over lags 1 to ``max_lag``."""
    c = fractional_coefficients(hurst, num_taps)
    lags = np.arange(1, max_lag + 1)
    filtered = np.array(
        [c[: num_taps - k] @ c[k:] if k < num_taps else 0.0 for k in lags]
    )
    return float(np.max(np.abs(filtered - fgn_autocorrelation(hurst, lags))))


def check_hurst(hurst: Any) -> float:
    if not _is_concrete(hurst):
        raise TypeError(
            "hurst must be a concrete float: the filter is computed in float64 "
            "when the transform is built. To sweep hurst under jax.jit or "
            "jax.vmap, pass fractional_coefficients(hurst, num_taps) of each "
            "value as add_correlated_noise(coefficients=...); under "
            "optax.inject_hyperparams, list hurst and num_taps in static_args."
        )
    value = float(np.asarray(hurst))
    if not 0.0 < value < 1.0:
        raise ValueError(f"hurst must be in (0, 1), got {hurst!r}.")
    return value


def check_num_taps(num_taps: Any) -> int:
    if not _is_concrete(num_taps):
        raise TypeError(
            "num_taps must be a concrete int (it fixes the state's shape); under "
            "optax.inject_hyperparams, list hurst and num_taps in static_args."
        )
    is_int = isinstance(num_taps, (int, np.integer, np.ndarray, jax.Array)) and (
        jnp.issubdtype(jnp.result_type(num_taps), jnp.integer)
    )
    if isinstance(num_taps, (bool, np.bool_)) or not is_int or jnp.ndim(num_taps):
        raise TypeError(f"num_taps must be an int >= 1, got {num_taps!r}.")
    if num_taps < 1:
        raise ValueError(f"num_taps must be >= 1, got {num_taps!r}.")
    return int(num_taps)


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_)) or jnp.result_type(value) == jnp.bool_


def anticorrelated_coefficients(correlation: Any) -> Any:
    """``(1, -correlation)``, checking ``correlation`` in [0, 1] where concrete.

    A concrete correlation gives float64 numpy coefficients (rounded to each
    leaf's dtype where they are used); a traced one keeps its dtype.
    """
    if _is_bool(correlation):
        raise TypeError(f"correlation must be a float in [0, 1], got {correlation!r}.")
    if jnp.ndim(correlation) != 0:
        raise ValueError(
            f"correlation must be a scalar, got shape {jnp.shape(correlation)}."
        )
    if _is_concrete(correlation):
        value = float(np.asarray(correlation))
        if not 0.0 <= value <= 1.0:  # also NaN
            raise ValueError(f"correlation must be in [0, 1], got {correlation!r}.")
        return np.array([1.0, -value])
    correlation = jnp.asarray(correlation)
    return jnp.stack([jnp.ones([], correlation.dtype), -correlation])


def check_coefficients(coefficients: Any) -> Any:
    """The coefficients as a float[K] array, K >= 1; finite where concrete.

    Concrete coefficients become a float64 numpy array, so that float64
    leaves get them unrounded and XLA sees constants; traced ones stay traced.
    """
    array = coefficients if not _is_concrete(coefficients) else None
    if array is None:
        values = np.asarray(coefficients)
        if values.dtype.kind not in "fiu":
            raise ValueError(
                f"coefficients must be real numbers, got {coefficients!r}."
            )
        if not np.all(np.isfinite(values)):
            raise ValueError(f"coefficients must be finite, got {coefficients!r}.")
        array = values.astype(np.float64)
    if array.ndim != 1 or array.shape[0] < 1:
        raise ValueError(
            "coefficients must be a non-empty 1-D sequence of floats, got shape "
            f"{array.shape}."
        )
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"coefficients must be real numbers, got dtype {array.dtype}.")
    return array
