"""Keys: what the transforms accept, what a state stores, and per-leaf streams.

The noise ``z_n`` of a leaf is a pure function of (base key, step ``n``, leaf
path): the base key is folded with ``n`` and then with a stable 64-bit digest
of ``jax.tree_util.keystr(path)``. Nothing depends on a leaf's position in the
tree, on Python's salted ``hash`` or on the process, so adding a leaf leaves
every other leaf's noise unchanged and every host of a multi-process job draws
the same numbers.
"""

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Key = jax.typing.ArrayLike | int


def _is_typed_key(key: Any) -> bool:
    return isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def key_shape(impl: Any = None) -> tuple[int, ...]:
    """Shape of the raw data of a key of ``impl`` (default: jax's default impl)."""
    return jax.eval_shape(
        lambda: jax.random.key_data(jax.random.key(0, impl=impl))
    ).shape


def key_impl(key: Any) -> Any:
    """Validates ``key`` and returns the impl its noise is drawn with.

    Only dtypes and shapes are inspected, so tracers are accepted.
    """
    if _is_typed_key(key):
        if key.shape:
            raise TypeError(
                f"key must be a single key, got a typed key array of shape {key.shape}."
            )
        return jax.random.key_impl(key)
    if isinstance(key, (bool, np.bool_)):
        raise TypeError(f"key must be an int seed or a PRNG key, got {key!r}.")
    if isinstance(key, (int, np.integer)):
        return jax.config.jax_default_prng_impl
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            "key must be an int seed, a scalar integer array, a raw uint32 key "
            f"(jax.random.PRNGKey) or a typed key (jax.random.key); got {key!r}."
        )
    if shape != () and (dtype != jnp.uint32 or tuple(shape) != key_shape()):
        raise TypeError(
            f"key: a raw key must be uint32{list(key_shape())} "
            f"(jax.random.PRNGKey), got {dtype}{list(shape)}. For another impl "
            "pass a typed key, jax.random.key(seed, impl=...)."
        )
    return jax.config.jax_default_prng_impl


def key_data(key: Any) -> jax.Array:
    """The raw uint32 data of a key accepted by :func:`key_impl`."""
    if _is_typed_key(key):
        return jax.random.key_data(key)
    if jnp.shape(key) == ():
        return jax.random.key_data(jax.random.key(key))
    return jnp.asarray(key, jnp.uint32)


def typed_key(key: Any) -> jax.Array:
    """A typed key of the impl :func:`key_impl` finds, from any accepted key."""
    impl = key_impl(key)  # validates first
    return jax.random.wrap_key_data(key_data(key), impl=impl)


def normalized_path(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """A leaf's path without a trailing ``.value``.

    A boxed leaf (a Flax NNX ``Variable``, a Linen ``Partitioned``) ends in
    ``.value``; it names the same leaf as the bare array, since
    ``nnx.Optimizer`` hands ``init`` the boxes and ``update`` the arrays.
    """
    if path and path[-1] == jax.tree_util.GetAttrKey("value"):
        return path[:-1]
    return path


def _leaf_ids(path: Any) -> tuple[np.uint32, np.uint32]:
    digest = hashlib.blake2b(
        jax.tree_util.keystr(normalized_path(path)).encode(), digest_size=8
    ).digest()
    high, low = np.frombuffer(digest, dtype="<u4")
    return high, low


# The impl whose hash ``_threefry`` writes out; vmap over its keys is exact
# (a stream drawn in a batch is bit for bit the stream drawn alone, as jax
# documents; rbg does not promise it).
BATCHED_IMPL = "threefry2x32"


def has_batched_impl(key: jax.Array) -> bool:
    return str(jax.random.key_impl(key)) == BATCHED_IMPL


def leaf_keys(step_key: jax.Array, paths: list[Any]) -> jax.Array:
    """``step_key`` folded with each path's digest: the leaves' keys, stacked."""
    ids = np.array([_leaf_ids(path) for path in paths], np.uint32).reshape(-1, 2)

    def fold(high, low):
        return jax.random.fold_in(jax.random.fold_in(step_key, high), low)

    if not has_batched_impl(step_key) or len(paths) < 2:
        return jnp.stack([fold(high, low) for high, low in ids])
    # One hash of all the digests instead of two per leaf: threefry lowers to a
    # loop on CPU, and hundreds of tiny loops dominated the compile time.
    return jax.vmap(fold)(ids[:, 0], ids[:, 1])
