"""The Hessian of a scalar function of a pytree, as a flat linear operator.

Every flatness diagnostic (``_hessian``) sees the Hessian only through
:func:`hessian_operator`: Hessian-vector products, forward-over-reverse
(``jax.jvp`` of ``jax.grad``), on one flat vector of the float leaves.

The vectors are flat, not pytrees, because Hutch++ orthonormalises a sketch
(a QR of a ``d x m`` matrix) and Lanczos (``matfree``) works on flat vectors
anyway. They are held in at least float32 whatever the leaves' dtype, so the
QR and the reorthogonalisation keep their accuracy for bfloat16 params; each
product casts its tangent to the leaves' dtypes. The flattening costs one
concatenation per product, small beside the product (about two gradients).
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from optax_antipgd import _trees


class HessianOperator(NamedTuple):
    """The Hessian of ``fn`` at ``params`` over the flat float leaves."""

    matvec: Callable[[jax.Array], jax.Array]  # [dim] -> [dim], H @ vector.
    rademacher: Callable[[jax.Array], jax.Array]  # key -> [dim], a +-1 probe.
    dim: int  # The number of float parameters.
    dtype: Any  # Of the flat vectors: float32 or wider.
    # [dim] -> a params-like tree of scalars: the sum of the vector's entries
    # on each float leaf, and 0 (in dtype) at the int and bool leaves.
    leaf_sums: Callable[[jax.Array], Any]


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int, or a TypeError / ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
    return int(value)


def check_batch_size(batch_size: Any, num_items: int) -> int | None:
    """A valid ``batch_size`` (``None`` or an int >= 1), capped at ``num_items``."""
    if batch_size is None:
        return None
    return min(check_count("batch_size", batch_size), max(num_items, 1))


def batched_map(fn: Callable[[Any], Any], xs: Any, batch_size: int | None) -> Any:
    """``fn`` over the leading axis of ``xs``: all at once, or in batches."""
    if batch_size is None:
        return jax.vmap(fn)(xs)
    return jax.lax.map(fn, xs, batch_size=batch_size)


def hessian_operator(fn: Callable[[Any], Any], params: Any) -> HessianOperator:
    """The Hessian of ``fn`` at ``params``, int and bool leaves held constant.

    Raises:
      TypeError: If ``fn`` is not callable or does not return a real scalar,
        or if ``params`` has a complex leaf (naming its path).
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable returning a scalar, got {fn!r}.")
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in paths_leaves]
    is_float = [_trees.is_float(leaf, path) for path, leaf in paths_leaves]
    float_leaves = [leaf for leaf, f in zip(leaves, is_float, strict=True) if f]
    leaf_dtypes = [jnp.result_type(leaf) for leaf in float_leaves]

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
            "fn must return a real scalar (its Hessian is taken), got "
            f"{jax.tree.map(lambda x: f'{x.dtype}{list(x.shape)}', out)}."
        )
    dtype = jnp.promote_types(out.dtype, jnp.float32)
    for leaf_dtype in leaf_dtypes:
        dtype = jnp.promote_types(dtype, leaf_dtype)
    _, unravel = ravel_pytree([jnp.asarray(leaf, dtype) for leaf in float_leaves])
    grad_fn = jax.grad(fn_of_float_leaves)

    def ravel(tree_leaves):
        if not tree_leaves:
            return jnp.zeros((0,), dtype)
        return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in tree_leaves])

    sizes = [int(np.prod(jnp.shape(leaf))) for leaf in float_leaves]
    starts = np.cumsum([0, *sizes])

    def matvec(vector):
        # Under vmap only the tangent is batched: the primal pass runs once.
        tangents = [
            t.astype(leaf_dtype)
            for t, leaf_dtype in zip(unravel(vector), leaf_dtypes, strict=True)
        ]
        _, product = jax.jvp(grad_fn, (float_leaves,), (tangents,))
        return ravel(product)

    def rademacher(key):
        # One draw over the flat vector: the hash compiles once, not per leaf.
        return jax.random.rademacher(key, (int(starts[-1]),), dtype)

    def leaf_sums(vector):
        sums = iter(
            jnp.sum(vector[start:end])
            for start, end in zip(starts[:-1], starts[1:], strict=True)
        )
        return jax.tree.unflatten(
            treedef,
            [next(sums) if f else jnp.zeros([], dtype) for f in is_float],
        )

    dim = int(starts[-1])
    return HessianOperator(matvec, rademacher, dim, dtype, leaf_sums)
