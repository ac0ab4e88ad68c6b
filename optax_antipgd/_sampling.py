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
import math
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
    word_sharding = None
    if sharding is not None:
        spec = (*sharding.spec, *(None,) * (len(shape) - len(sharding.spec)))
        word_sharding = NamedSharding(sharding.mesh, P(*spec[:-1], None))
    words = jax.random.bits(
        key, _words_shape(shape), jnp.uint32, out_sharding=word_sharding
    )
    signs = _signs(words, shape, dtype)
    if word_sharding is not None and word_sharding.spec != sharding.spec:
        signs = jax.reshard(signs, sharding)
    return signs


def _signs(words: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """+-1 from packed bits: bit ``j`` of word ``w`` is element ``32w + j``."""
    length = shape[-1] if shape else 1
    shifts = jnp.arange(_BITS_PER_WORD, dtype=jnp.uint32).reshape(
        (1,) * words.ndim + (_BITS_PER_WORD,)
    )
    bits = (words[..., None] >> shifts) & 1
    bits = bits.reshape(*words.shape[:-1], words.shape[-1] * _BITS_PER_WORD)
    bits = bits[..., :length]
    return jnp.where(bits == 1, -1.0, 1.0).astype(dtype).reshape(shape)


def _words_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the packed words of a Rademacher draw of ``shape``."""
    length = shape[-1] if shape else 1
    return (*shape[:-1], -(-length // _BITS_PER_WORD))


def _normal_from_bits(bits: jax.Array, dtype: Any) -> jax.Array:
    """``jax.random.normal`` of the key whose ``jax.random.bits`` are ``bits``.

    The same operations in the same order as jax's ``uniform`` on
    ``[nextafter(-1, 0), 1)`` followed by ``sqrt(2) * erf_inv``, so the result
    is bit for bit the same (``tests/test_performance_paths.py`` pins it).
    Used where several leaves' bits are drawn in one batch.
    """
    finfo = jnp.finfo(dtype)
    low = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
    minval = jax.lax.broadcast_to_rank(
        jax.lax.convert_element_type(low, dtype), bits.ndim
    )
    maxval = jax.lax.broadcast_to_rank(
        jax.lax.convert_element_type(np.array(1.0, dtype), dtype), bits.ndim
    )
    float_bits = jax.lax.shift_right_logical(
        bits, jnp.array(finfo.bits - finfo.nmant, bits.dtype)
    )
    float_bits = jax.lax.bitwise_or(
        float_bits, jnp.asarray(np.array(1.0, dtype).view(bits.dtype), bits.dtype)
    )
    floats = jax.lax.bitcast_convert_type(float_bits, dtype) - jnp.array(1.0, dtype)
    uniform = jax.lax.max(minval, floats * (maxval - minval) + minval)
    return jax.lax.mul(np.array(np.sqrt(2), dtype), jax.lax.erf_inv(uniform))


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


# vmap over keys is exact for this impl: a leaf's stream drawn in a batch is
# bit for bit the stream drawn alone (jax documents it; rbg does not promise it).
_BATCHED_IMPL = "threefry2x32"


def _leaf_keys(step_key: jax.Array, paths: list[Any]) -> list[jax.Array]:
    """``step_key`` folded with each path's digest: the leaves' keys."""
    ids = np.array([_leaf_ids(path) for path in paths], np.uint32).reshape(-1, 2)

    def fold(high, low):
        return jax.random.fold_in(jax.random.fold_in(step_key, high), low)

    if not _has_batched_impl(step_key) or len(paths) < 2:
        return [fold(high, low) for high, low in ids]
    # One hash of all the digests instead of two per leaf: threefry lowers to a
    # loop on CPU, and hundreds of tiny loops dominated the compile time.
    keys = jax.vmap(fold)(ids[:, 0], ids[:, 1])
    return [keys[index] for index in range(len(paths))]


def _has_batched_impl(key: jax.Array) -> bool:
    return str(jax.random.key_impl(key)) == _BATCHED_IMPL


def _batches_draws(key: jax.Array) -> bool:
    """Whether same-shaped leaves draw their bits in one batch.

    A batch is one hash over the stacked leaves: one loop to compile instead of
    one per leaf. But a stacked array has one sharding, and same-shaped leaves
    sharded differently (q and o projections) would need collectives to be cut
    out of it; a trace does not always know the shardings, so batch only where
    no sharding is possible: one device.
    """
    return _has_batched_impl(key) and jax.device_count() == 1


def _batch_noise(keys, leaves, scale, distribution):
    """The noise of same-shaped, same-dtype leaves from one batched draw of bits."""
    shape, dtype = jnp.shape(leaves[0]), jnp.result_type(leaves[0])
    draw_dtype = _draw_dtype(dtype)
    scale = scale.astype(draw_dtype)
    stacked_keys = jnp.stack(keys)
    if distribution == "gaussian":
        word = jnp.uint64 if draw_dtype == jnp.float64 else jnp.uint32
        bits = jax.vmap(lambda key: jax.random.bits(key, shape, word))(stacked_keys)
        # The bits stay stacked (on CPU they are a loop's output anyway); each
        # leaf's transform reads its slice and fuses with the leaf's update.
        noise = [
            _normal_from_bits(bits[index], draw_dtype) for index in range(len(keys))
        ]
    else:
        words_shape = _words_shape(shape)
        words = jax.vmap(lambda key: jax.random.bits(key, words_shape, jnp.uint32))(
            stacked_keys
        )
        noise = [_signs(words[index], shape, draw_dtype) for index in range(len(keys))]
    return [
        _placed_like(leaf, (scale * z).astype(dtype))
        for leaf, z in zip(leaves, noise, strict=True)
    ]


# Elements of random words one batched draw makes at most. On CPU threefry
# lowers to a loop over its whole output: past the cache, every round streams
# through memory, and a batch as large as the params steps slower than per-leaf
# draws. So batches stay cache-sized: most of the compile time saved, none of
# the step time lost.
_BATCH_WORDS = 2**17


def _chunks(groups, leaves, distribution):
    """Splits groups of same-shaped leaves into batches of at most _BATCH_WORDS."""
    for members in groups:
        shape = jnp.shape(leaves[members[0][0]])
        words = math.prod(
            _words_shape(shape) if distribution == "rademacher" else shape
        )
        size = max(1, _BATCH_WORDS // max(1, words))
        for start in range(0, len(members), size):
            yield members[start : start + size]


def _tree_noise(key, step, tree, scale, distribution):
    step_key = jax.random.fold_in(key, step)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    noised = [index for index, (_, leaf) in enumerate(paths_leaves) if is_noised(leaf)]
    keys = _leaf_keys(step_key, [paths_leaves[index][0] for index in noised])
    leaves = [leaf for _, leaf in paths_leaves]
    noise = [None] * len(leaves)
    batches = _batches_draws(key)
    groups = {}
    for index, leaf_key in zip(noised, keys, strict=True):
        leaf = leaves[index]
        group = (jnp.shape(leaf), jnp.result_type(leaf))
        groups.setdefault(group if batches else index, []).append((index, leaf_key))
    for members in _chunks(groups.values(), leaves, distribution):
        indices = [index for index, _ in members]
        if len(members) > 1:
            batch = _batch_noise(
                [leaf_key for _, leaf_key in members],
                [leaves[index] for index in indices],
                scale,
                distribution,
            )
            for index, leaf_noise in zip(indices, batch, strict=True):
                noise[index] = leaf_noise
            continue
        (index, leaf_key), leaf = members[0], leaves[members[0][0]]
        dtype = jnp.result_type(leaf)
        draw_dtype = _draw_dtype(dtype)
        z = _draw(
            leaf_key, jnp.shape(leaf), draw_dtype, distribution, _traced_sharding(leaf)
        )
        noise[index] = _placed_like(leaf, (scale.astype(draw_dtype) * z).astype(dtype))
    return jax.tree.unflatten(treedef, noise)


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
