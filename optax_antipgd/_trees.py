"""Which leaves of a pytree take part: float leaves do, ints and bools do not."""

from typing import Any

import jax
import jax.numpy as jnp


def is_float(leaf: Any, path: Any = ()) -> bool:
    """Whether ``leaf`` is real floating point; complex leaves are refused.

    Args:
      leaf: An array, a scalar or a ``jax.ShapeDtypeStruct``.
      path: The leaf's path in its tree, named in the error.

    Raises:
      TypeError: For a complex leaf, naming its path.
    """
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        where = f" at {jax.tree_util.keystr(tuple(path))}" if path else ""
        raise TypeError(
            f"complex leaves are not supported: the leaf{where} has dtype {dtype}. "
            "Split it into real and imaginary parts (two float leaves)."
        )
    return bool(jnp.issubdtype(dtype, jnp.floating))
