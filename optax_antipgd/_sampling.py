"""Keys, per-leaf noise streams and the two noise distributions.

The noise ``z_n`` of a leaf is a pure function of (base key, step ``n``, leaf
path): the base key is folded with ``n`` and then with a stable 64-bit digest
of ``jax.tree_util.keystr(path)``. Nothing depends on a leaf's position in the
tree, on Python's salted ``hash`` or on the process, so adding a leaf leaves
every other leaf's noise unchanged and every host of a multi-process job draws
the same numbers.
"""

import functools
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DISTRIBUTIONS = ("gaussian", "rademacher")

# The key impls whose noise ``denoised_params`` can regenerate from a state,
# crossed with the distributions: a state records its sampler as an index into
# this tuple, since a state may hold numeric arrays only.
SAMPLERS = tuple(
    (impl, distribution)
    for impl in ("threefry2x32", "rbg", "unsafe_rbg")
    for distribution in DISTRIBUTIONS
)

_BITS_PER_WORD = 32


def check_distribution(distribution: Any) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}."
        )
    return distribution


def _is_typed_key(key: Any) -> bool:
    return isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def _key_shape(impl: Any = None) -> tuple[int, ...]:
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
    if shape != () and (dtype != jnp.uint32 or tuple(shape) != _key_shape()):
        raise TypeError(
            f"key: a raw key must be uint32{list(_key_shape())} "
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


def sampler_index(impl: Any, distribution: str) -> int:
    """Index of (impl, distribution) in :data:`SAMPLERS`, -1 for other impls."""
    try:
        return SAMPLERS.index((str(impl), distribution))
    except ValueError:
        return -1


def _leaf_ids(path: Any) -> tuple[np.uint32, np.uint32]:
    # A boxed leaf (a Flax NNX Variable, a Linen Partitioned) ends in `.value`;
    # it draws the stream of the bare array, since nnx.Optimizer hands init
    # the boxes and update the arrays.
    if path and path[-1] == jax.tree_util.GetAttrKey("value"):
        path = path[:-1]
    digest = hashlib.blake2b(
        jax.tree_util.keystr(path).encode(), digest_size=8
    ).digest()
    high, low = np.frombuffer(digest, dtype="<u4")
    return high, low


def _draw_dtype(dtype: Any) -> Any:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _rademacher(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """+-1 from one random bit per element, packed 32 to a word on the last axis."""
    length = shape[-1] if shape else 1
    num_words = -(-length // _BITS_PER_WORD)
    words = jax.random.bits(key, (*shape[:-1], num_words), jnp.uint32)
    shifts = jnp.arange(_BITS_PER_WORD, dtype=jnp.uint32).reshape(
        (1,) * words.ndim + (_BITS_PER_WORD,)
    )
    bits = (words[..., None] >> shifts) & 1
    bits = bits.reshape(*shape[:-1], num_words * _BITS_PER_WORD)[..., :length]
    return jnp.where(bits == 1, -1.0, 1.0).astype(dtype).reshape(shape)


def _draw(key: jax.Array, shape: tuple[int, ...], dtype: Any, distribution: str):
    if distribution == "gaussian":
        return jax.random.normal(key, shape, dtype)
    return _rademacher(key, shape, dtype)


def is_noised(leaf: Any) -> bool:
    """Whether a leaf receives noise: float leaves do, ints and bools do not."""
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"complex leaves are not supported, got dtype {dtype}.")
    return jnp.issubdtype(dtype, jnp.floating)


def _tree_noise(key, step, tree, scale, distribution):
    step_key = jax.random.fold_in(key, step)

    def leaf_noise(path, leaf):
        if not is_noised(leaf):
            return None
        high, low = _leaf_ids(path)
        leaf_key = jax.random.fold_in(jax.random.fold_in(step_key, high), low)
        draw_dtype = _draw_dtype(jnp.result_type(leaf))
        z = _draw(leaf_key, jnp.shape(leaf), draw_dtype, distribution)
        return (scale.astype(draw_dtype) * z).astype(jnp.result_type(leaf))

    return jax.tree.map_with_path(leaf_noise, tree)


def tree_noise(
    key: jax.Array,
    step: jax.Array,
    tree: Any,
    scale: jax.Array,
    distribution: str,
) -> Any:
    """``scale * z_step`` for every float leaf of ``tree``, ``None`` elsewhere.

    ``tree`` may hold arrays or ``jax.ShapeDtypeStruct``s; ``None`` and
    ``optax.MaskedNode`` nodes are kept. When ``scale`` is 0 the draw is skipped
    and the noise is exactly zero.
    """
    zeros = lambda: jax.tree.map(_zeros_or_none, tree)  # noqa: E731
    draw = lambda: _tree_noise(key, step, tree, scale, distribution)  # noqa: E731
    is_zero = scale == 0
    if isinstance(is_zero, jax.core.Tracer):
        return jax.lax.cond(is_zero, zeros, draw)
    # Outside a trace, cond would compile its fresh branches at every call.
    return zeros() if is_zero else draw()


def _zeros_or_none(leaf):
    return (
        jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf)) if is_noised(leaf) else None
    )


def recorded_tree_noise(
    sampler: jax.Array,
    raw_key: jax.Array,
    step: jax.Array,
    tree: Any,
    scale: jax.Array,
) -> Any:
    """:func:`tree_noise` with the sampler a state records (an index, maybe traced).

    A traced index compiles the samplers whose impl has keys of ``raw_key``'s
    shape, and picks one with ``lax.switch``.
    """

    def draw(index):
        impl, distribution = SAMPLERS[index]
        key = jax.random.wrap_key_data(raw_key, impl=impl)
        return tree_noise(key, step, tree, scale, distribution)

    if not isinstance(sampler, jax.core.Tracer):
        return draw(int(sampler))
    fitting = [
        index
        for index, (impl, _) in enumerate(SAMPLERS)
        if _key_shape(impl) == raw_key.shape
    ]
    branch_of_sampler = np.zeros(len(SAMPLERS), np.int32)
    branch_of_sampler[fitting] = np.arange(len(fitting))
    return jax.lax.switch(
        jnp.asarray(branch_of_sampler)[sampler],
        [functools.partial(draw, index) for index in fitting],
    )
