"""The filters of the correlated family: fractional Gaussian noise's coefficients."""

import re

import numpy as np
import pytest

import optax_antipgd as ap
from optax_antipgd import _filters


def _fgn_covariance_matrix(hurst, size):
    lags = np.abs(np.arange(size)[:, None] - np.arange(size)[None, :])
    return _filters.fgn_autocorrelation(hurst, lags)


@pytest.mark.parametrize("hurst", [0.1, 0.25, 0.4, 0.6, 0.8])
def test_coefficients_are_the_wold_moving_average_of_fgn(hurst):
    # The Wold coefficients psi_j (psi_0 = 1) are the Cholesky factor's last
    # row of the covariance of a long window, read backwards and normalised
    # by its diagonal: the innovations algorithm's limit. A window of 1500
    # brings it within 1e-3 of the limit at these lags (its error falls as
    # 1/window); the library extrapolates the limit by another route.
    size, num_taps = 1500, 8
    cholesky = np.linalg.cholesky(_fgn_covariance_matrix(hurst, size))
    psi = cholesky[-1, ::-1][:num_taps] / cholesky[-1, -1]
    expected = psi / np.linalg.norm(psi)
    np.testing.assert_allclose(
        ap.fractional_coefficients(hurst, num_taps), expected, atol=1e-3
    )


def test_hurst_one_half_is_white_noise():
    np.testing.assert_array_equal(ap.fractional_coefficients(0.5, 5), [1, 0, 0, 0, 0])


@pytest.mark.parametrize("num_taps", [1, 2, 8, 33])
def test_coefficients_have_unit_norm_and_float64(num_taps):
    coefficients = ap.fractional_coefficients(0.3, num_taps)
    assert coefficients.shape == (num_taps,) and coefficients.dtype == np.float64
    np.testing.assert_allclose(np.sum(coefficients**2), 1.0, rtol=1e-12)


def test_small_hurst_tends_to_anti_pgds_filter():
    # The distance shrinks in proportion to H: 4e-3 at H = 1e-3, 5e-4 at 1e-4.
    coefficients = ap.fractional_coefficients(1e-4, 4)
    np.testing.assert_allclose(coefficients, [2**-0.5, -(2**-0.5), 0, 0], atol=1e-3)


@pytest.mark.parametrize("hurst", [0.1, 0.25, 0.4])
def test_eight_taps_match_fgn_autocorrelation_within_0_01_at_lags_1_to_8(hurst):
    c = ap.fractional_coefficients(hurst, 8)
    lags = np.arange(1, 9)
    filtered = np.array([c[: 8 - k] @ c[k:] if k < 8 else 0.0 for k in lags])
    error = np.abs(filtered - _filters.fgn_autocorrelation(hurst, lags))
    assert np.max(error) < 0.01, error


def test_the_documented_accuracy_table_is_what_the_filters_give():
    doc = ap.fractional_coefficients.__doc__
    rows = re.findall(r"^\s+(0\.\d+)((?:\s+[\d.]+){6})\s*$", doc, flags=re.MULTILINE)
    assert len(rows) == 8
    taps = (2, 4, 8, 16, 32, 64)
    for hurst, cells in rows:
        for num_taps, cell in zip(taps, cells.split(), strict=True):
            error = _filters.autocorrelation_error(float(hurst), num_taps)
            assert f"{error:.4f}" == cell or (cell == "0" and error == 0), (
                hurst,
                num_taps,
                error,
                cell,
            )


@pytest.mark.parametrize("hurst", [0.0, 1.0, -0.2, 1.5, float("nan")])
def test_hurst_outside_the_open_unit_interval_is_rejected(hurst):
    with pytest.raises(ValueError, match="hurst"):
        ap.fractional_coefficients(hurst, 8)
    with pytest.raises(ValueError, match="hurst"):
        ap.add_fractional_noise(0.1, 0, hurst=hurst)


@pytest.mark.parametrize("num_taps", [0, -1])
def test_num_taps_below_one_is_rejected(num_taps):
    with pytest.raises(ValueError, match="num_taps"):
        ap.add_fractional_noise(0.1, 0, hurst=0.3, num_taps=num_taps)


@pytest.mark.parametrize("num_taps", [2.0, "8", True])
def test_num_taps_not_an_int_is_rejected(num_taps):
    with pytest.raises(TypeError, match="num_taps"):
        ap.fractional_coefficients(0.3, num_taps)
