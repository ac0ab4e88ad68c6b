"""Anti-PGD and PGD: anticorrelated and independent noise injection for optax."""

from optax_antipgd._alias import anti_pgd
from optax_antipgd._alias import pgd
from optax_antipgd._hessian import hessian_trace
from optax_antipgd._noise import AnticorrelatedNoiseState
from optax_antipgd._noise import IndependentNoiseState
from optax_antipgd._noise import add_anticorrelated_noise
from optax_antipgd._noise import add_independent_noise
from optax_antipgd._noise import denoised_params

__version__ = "0.1.0"

__all__ = (
    "AnticorrelatedNoiseState",
    "IndependentNoiseState",
    "add_anticorrelated_noise",
    "add_independent_noise",
    "anti_pgd",
    "denoised_params",
    "hessian_trace",
    "pgd",
)
