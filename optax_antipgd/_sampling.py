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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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


def _rademacher(
    key: jax.Array, shape: tuple[int, ...], dtype: Any, sharding: Any
) -> jax.Array:
    """+-1 from one random bit per element, packed 32 to a word on the last axis.

    The words are drawn with the leaf's sharding but for the last axis, which
    they keep whole; so a device that holds part of a row computes the row's
    few words itself, and unpacking them needs no communication.
    """
    length = shape[-1] if shape else 1
    num_words = -(-length // _BITS_PER_WORD)
    word_sharding = None
    if sharding is not None:
        spec = (*sharding.spec, *(None,) * (len(shape) - len(sharding.spec)))
        word_sharding = NamedSharding(sharding.mesh, P(*spec[:-1], None))
    words = jax.random.bits(
        key, (*shape[:-1], num_words), jnp.uint32, out_sharding=word_sharding
    )
    shifts = jnp.arange(_BITS_PER_WORD, dtype=jnp.uint32).reshape(
        (1,) * words.ndim + (_BITS_PER_WORD,)
    )
    bits = (words[..., None] >> shifts) & 1
    bits = bits.reshape(*shape[:-1], num_words * _BITS_PER_WORD)[..., :length]
    signs = jnp.where(bits == 1, -1.0, 1.0).astype(dtype).reshape(shape)
    if word_sharding is not None and word_sharding.spec != sharding.spec:
        signs = jax.reshard(signs, sharding)
    return signs


def _draw(key, shape, dtype, distribution, sharding):
    if distribution == "gaussian":
        return jax.random.normal(key, shape, dtype, out_sharding=sharding)
    return _rademacher(key, shape, dtype, sharding)


def is_noised(leaf: Any) -> bool:
    """Whether a leaf receives noise: float leaves do, ints and bools do not."""
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"complex leaves are not supported, got dtype {dtype}.")
    return jnp.issubdtype(dtype, jnp.floating)


def _traced_sharding(leaf: Any) -> NamedSharding | None:
    """A traced leaf's sharding where the trace knows it (explicit mesh axes)."""
    if not isinstance(leaf, jax.core.Tracer):
        return None
    sharding = jax.typeof(leaf).sharding
    if isinstance(sharding, NamedSharding) and any(sharding.spec):
        return sharding
    return None


def _placed_like(leaf: Any, noise: jax.Array) -> jax.Array:
    """Gives noise drawn outside a trace the sharding of its concrete leaf.

    Only leaves spread over several devices are placed: a single-device leaf's
    noise stays uncommitted, as jax's own eager results are.
    """
    is_concrete = isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
    if is_concrete and len(leaf.sharding.device_set) > 1:
        return jax.device_put(noise, leaf.sharding)
    return noise


def _tree_noise(key, step, tree, scale, distribution):
    step_key = jax.random.fold_in(key, step)

    def leaf_noise(path, leaf):
        if not is_noised(leaf):
            return None
        high, low = _leaf_ids(path)
        leaf_key = jax.random.fold_in(jax.random.fold_in(step_key, high), low)
        dtype = jnp.result_type(leaf)
        draw_dtype = _draw_dtype(dtype)
        z = _draw(
            leaf_key, jnp.shape(leaf), draw_dtype, distribution, _traced_sharding(leaf)
        )
        return _placed_like(leaf, (scale.astype(draw_dtype) * z).astype(dtype))

    return jax.tree.map_with_path(leaf_noise, tree)


def tree_noise(
    key: jax.Array,
    step: jax.Array,
    tree: Any,
    scale: jax.Array,
    distribution: str,
) -> Any:
    """``scale * z_step`` for every float leaf of ``tree``, ``None`` elsewhere.

    ``None`` and ``optax.MaskedNode`` nodes are kept. Each noise leaf has the
    sharding of its leaf. When ``scale`` is 0 the draw is skipped and the noise
    is exactly zero.
    """
    draw = lambda: _tree_noise(key, step, tree, scale, distribution)  # noqa: E731
    is_zero = scale == 0
    if not isinstance(is_zero, jax.core.Tracer):
        # Outside a trace, cond would compile its fresh branches at every call.
        return jax.tree.map(_zeros_like, tree) if is_zero else draw()
    # Inside shard_map, a key that differs per device makes the draw vary over
    # the mesh axes; the zeros must vary alike for the branches to agree.
    axes = frozenset().union(
        *(
            jax.typeof(x).manual_axis_type.varying
            for x in (jax.random.key_data(key), step, scale)
        )
    )

    def zeros():
        zeros_tree = jax.tree.map(_zeros_like, tree)
        if not axes:
            return zeros_tree
        return jax.lax.pcast(zeros_tree, tuple(sorted(axes)), to="varying")

    return jax.lax.cond(is_zero, zeros, draw)


def _zeros_like(leaf):
    if not is_noised(leaf):
        return None
    zeros = jnp.zeros(
        jnp.shape(leaf), jnp.result_type(leaf), out_sharding=_traced_sharding(leaf)
    )
    return _placed_like(leaf, zeros)


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
