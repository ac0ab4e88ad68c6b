"""Hutchinson's estimate of the trace of a Hessian: the flatness diagnostic."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_antipgd import _keys
from optax_antipgd import _trees


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}.")
    return int(value)


def hessian_trace(
    fn: Callable[[Any], jax.typing.ArrayLike],
    params: Any,
    key: Any,
    *,
    num_samples: int = 64,
    batch_size: int | None = None,
) -> jax.Array:
    r"""Hutchinson's estimate of the trace of the Hessian of ``fn`` at ``params``.

    .. math::

        \operatorname{Tr} \nabla^2 f(w) \approx \frac{1}{S} \sum_{s=1}^{S}
        z_s^\top \nabla^2 f(w) \, z_s,
        \qquad z_s \in \{-1, +1\}^d \text{ i.i.d. Rademacher}.

    The estimate is unbiased; its variance is
    :math:`2 (\|H\|_F^2 - \sum_i H_{ii}^2) / S`, so it is exact for a diagonal
    Hessian. Each Hessian-vector product is forward-over-reverse
    (``jax.jvp`` of ``jax.grad``): about the cost of two gradients, and no
    :math:`d \times d` matrix is ever formed. This is the flatness that
    Anti-PGD's implicit regulariser :math:`\frac{\sigma^2}{2}
    \operatorname{Tr} \nabla^2 L` penalises.

    ``params`` may be any pytree. Float leaves are differentiated; int and bool
    leaves are held constant (they have no Hessian). The function is pure and
    jit-able; ``key`` may be a tracer.

    By default all probes are evaluated at once (``jax.vmap``): memory grows
    as ``num_samples`` times the size of the params and of ``fn``'s
    activations. ``batch_size`` bounds it, evaluating ``batch_size`` probes at
    a time with ``jax.lax.map``; the result is the same to rounding.

    Args:
      fn: A function of ``params`` returning a scalar, e.g. a loss with its
        data bound: ``lambda p: loss(p, x, y)``.
      params: The point at which the Hessian is taken, a pytree of arrays.
      key: An int seed, a raw ``uint32`` key (``jax.random.PRNGKey``), a typed
        key (``jax.random.key``, any impl) or a scalar integer array; it may
        be a tracer.
      num_samples: The number :math:`S` of probes, ``>= 1``.
      batch_size: The number of probes evaluated at a time, ``>= 1``; ``None``
        evaluates all at once. Need not divide ``num_samples``.

    Returns:
      The estimate, a scalar in the dtype of ``fn``'s output, at least float32.

    Raises:
      ValueError: If ``num_samples`` or ``batch_size`` is below 1.
      TypeError: If ``num_samples`` or ``batch_size`` is not an int, if ``fn``
        does not return a real scalar, if ``params`` has complex leaves or if
        ``key`` is not a key.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_antipgd as ap
      >>> # The widening valley: Tr H = d * v^2 + |u|^2 = 4 * 0.25 + 4 = 5.
      >>> valley = lambda p: 0.5 * p["v"] ** 2 * jnp.sum(p["u"] ** 2)
      >>> params = {"u": jnp.ones(4), "v": jnp.asarray(0.5)}
      >>> trace = ap.hessian_trace(valley, params, key=0, num_samples=4096)
      >>> bool(jnp.abs(trace - 5.0) < 0.3)  # 5 standard deviations of the estimate
      True

    References:
      Hutchinson, `A Stochastic Estimator of the Trace of the Influence Matrix
      for Laplacian Smoothing Splines
      <https://doi.org/10.1080/03610919008812866>`_, 1990

      Orvieto et al, `Anticorrelated Noise Injection for Improved
      Generalization <https://arxiv.org/abs/2202.02831>`_, 2022
    """
    num_samples = _check_count("num_samples", num_samples)
    if batch_size is not None:
        batch_size = min(_check_count("batch_size", batch_size), num_samples)
    if not callable(fn):
        raise TypeError(f"fn must be a callable returning a scalar, got {fn!r}.")
    base_key = _keys.typed_key(key)

    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in paths_leaves]
    is_float = [_trees.is_float(leaf, path) for path, leaf in paths_leaves]
    float_leaves = [leaf for leaf, f in zip(leaves, is_float, strict=True) if f]

    def fn_of_float_leaves(floats):
        floats = iter(floats)
        merged = [
            next(floats) if f else leaf
            for leaf, f in zip(leaves, is_float, strict=True)
        ]
        return fn(jax.tree.unflatten(treedef, merged))

    out = jax.eval_shape(fn_of_float_leaves, float_leaves)
    if (
        not hasattr(out, "shape")
        or out.shape != ()
        or not jnp.issubdtype(out.dtype, jnp.floating)
    ):
        raise TypeError(
            "fn must return a real scalar (its Hessian trace is estimated), got "
            f"{jax.tree.map(lambda x: f'{x.dtype}{list(x.shape)}', out)}."
        )
    acc_dtype = jnp.promote_types(out.dtype, jnp.float32)
    grad_fn = jax.grad(fn_of_float_leaves)

    def quadratic_form(probe_key):
        # z^T H z for one probe; the primal pass is not batched under vmap.
        leaf_keys = jax.random.split(probe_key, len(float_leaves))
        probes = [
            jax.random.rademacher(k, jnp.shape(leaf), jnp.result_type(leaf))
            for k, leaf in zip(leaf_keys, float_leaves, strict=True)
        ]
        _, hvp = jax.jvp(grad_fn, (float_leaves,), (probes,))
        terms = [
            jnp.vdot(z.astype(acc_dtype), hz.astype(acc_dtype))
            for z, hz in zip(probes, hvp, strict=True)
        ]
        return sum(terms, jnp.zeros([], acc_dtype))

    probe_keys = jax.random.split(base_key, num_samples)
    if batch_size is None:
        forms = jax.vmap(quadratic_form)(probe_keys)
    else:
        forms = jax.lax.map(quadratic_form, probe_keys, batch_size=batch_size)
    return jnp.mean(forms)
