"""Anti-PGD and its family: correlated noise injection for optax, and flatness."""

from optax_antipgd._alias import anti_pgd
from optax_antipgd._alias import fractional_pgd
from optax_antipgd._alias import pgd
from optax_antipgd._filters import fractional_coefficients
from optax_antipgd._hessian import hessian_block_traces
from optax_antipgd._hessian import hessian_block_traces_with_stderr
from optax_antipgd._hessian import hessian_eigenvalues
from optax_antipgd._hessian import hessian_spectrum
from optax_antipgd._hessian import hessian_trace
from optax_antipgd._hessian import hessian_trace_with_stderr
from optax_antipgd._noise import AnticorrelatedNoiseState
from optax_antipgd._noise import CorrelatedNoiseState
from optax_antipgd._noise import IndependentNoiseState
from optax_antipgd._noise import add_anticorrelated_noise
from optax_antipgd._noise import add_correlated_noise
from optax_antipgd._noise import add_fractional_noise
from optax_antipgd._noise import add_independent_noise
from optax_antipgd._noise import denoised_params

__version__ = "0.2.0.dev0"

__all__ = (
    "AnticorrelatedNoiseState",
    "CorrelatedNoiseState",
    "IndependentNoiseState",
    "add_anticorrelated_noise",
    "add_correlated_noise",
    "add_fractional_noise",
    "add_independent_noise",
    "anti_pgd",
    "denoised_params",
    "fractional_coefficients",
    "fractional_pgd",
    "hessian_block_traces",
    "hessian_block_traces_with_stderr",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
    "hessian_trace_with_stderr",
    "pgd",
)
