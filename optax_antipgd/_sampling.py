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

from optax_antipgd import _threefry

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
    Used where the bits are hashed by ``_threefry``.
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


def _draws_in_loops(key: jax.Array) -> bool:
    """Whether same-shaped leaves draw their noise in one loop (:func:`_group_draws`).

    Where jax lowers threefry to a loop over the whole output (CPU) and no
    sharding is possible (one device): a stacked draw has one sharding, and
    same-shaped leaves sharded differently would need collectives to be cut
    out of it. Elsewhere each leaf draws with ``jax.random``.
    """
    return (
        _has_batched_impl(key)
        and jax.config.jax_threefry_partitionable
        and jax.default_backend() == "cpu"
        and jax.device_count() == 1
    )


# Elements one iteration of a draw loop hashes: a chunk stays in cache, and is
# large enough for the loop's overhead not to show. (XLA CPU runs a loop body
# on one thread, as it does jax's own threefry loop; benchmarks/RESULTS.md
# weighs that against per-leaf fusions, which compile once per leaf.)
_CHUNK = 2**16


def _group_draws(keys, shape, dtype, scale, distribution):
    """``scale * z`` of same-shaped leaves, stacked, from one loop over their counters.

    ``keys`` are the leaves' raw keys, stacked. Each iteration hashes a
    cache-sized chunk of one leaf's counters and transforms it, all in one
    fusion (``_threefry``); the loop's output is the one buffer the draw is
    written to, so noise read twice (the update, the stored state) is hashed
    once, and the hash is compiled once per group, not once per leaf. When
    ``scale`` is 0 the loop runs no iteration: the noise is the zeros it
    starts from, and nothing is hashed. Returns scaled normals of ``dtype``,
    or for Rademacher the packed words (unscaled).

    The scale multiplies the normals in the loop, in the same fusion as the
    transform: XLA folds ``scale * (sqrt(2) * erf_inv(u))`` there as it does
    for a ``jax.random.normal`` draw, so the two agree bit for bit.
    """
    gaussian = distribution == "gaussian"
    out_shape = shape if gaussian else _words_shape(shape)
    out_dtype = dtype if gaussian else jnp.uint32
    word = _word(dtype) if gaussian else jnp.uint32
    size = math.prod(out_shape)
    if size == 0:
        return jnp.zeros((len(keys), *out_shape), out_dtype)
    chunk = _chunk_size(size)
    num_chunks = -(-size // chunk)

    def draw_chunk(index, draws):
        key = keys[index // num_chunks]
        start = (index % num_chunks).astype(jnp.uint32) * np.uint32(chunk)
        counters = start + jax.lax.iota(jnp.uint32, chunk)
        values = _threefry.bits(key, counters, word)
        if gaussian:
            values = scale.astype(dtype) * _normal_from_bits(values, dtype)
        return jax.lax.dynamic_update_index_in_dim(draws, values, index, 0)

    total = len(keys) * num_chunks
    zeros = _varying(jnp.zeros((total, chunk), out_dtype), keys, scale)
    iterations = jnp.where(scale == 0, 0, total)
    draws = jax.lax.fori_loop(0, iterations, draw_chunk, zeros)
    draws = draws.reshape(len(keys), num_chunks * chunk)[:, :size]
    return draws.reshape(len(keys), *out_shape)


def _fits_a_loop(leaf: Any) -> bool:
    """Whether a leaf is small enough for the loop's 32-bit counters."""
    return math.prod(jnp.shape(leaf)) < _threefry.MAX_SIZE


def _chunk_size(size: int) -> int:
    """Elements per iteration: the largest divisor of ``size`` up to _CHUNK.

    A divisor makes the stacked chunks exactly the leaves, with no padding to
    slice off (a slice is one more pass over memory). Sizes with no divisor
    between _CHUNK / 2 and _CHUNK (primes) are padded up to whole chunks.
    """
    if size <= _CHUNK:
        return size
    for chunk in range(_CHUNK, _CHUNK // 2, -1):
        if size % chunk == 0:
            return chunk
    return _CHUNK


def _varying(value: Any, *sources: jax.Array) -> Any:
    """``value``, varying over the shard_map axes that any of ``sources`` varies over.

    Inside shard_map, a key that differs per device makes a draw vary over the
    mesh axes; zeros standing in for it must vary alike.
    """
    axes = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in sources))
    if not axes:
        return value
    return jax.lax.pcast(value, tuple(sorted(axes)), to="varying")


def _word(dtype: Any) -> Any:
    return jnp.uint64 if dtype == jnp.float64 else jnp.uint32


def _tree_noise(key, step, tree, scale, distribution):
    step_key = jax.random.fold_in(key, step)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [leaf for _, leaf in paths_leaves]
    noised = [index for index, leaf in enumerate(leaves) if is_noised(leaf)]
    keys = _leaf_keys(step_key, [paths_leaves[index][0] for index in noised])
    noise = [None] * len(leaves)
    in_loops = _draws_in_loops(key)
    groups = {}
    for index, leaf_key in zip(noised, keys, strict=True):
        leaf = leaves[index]
        shape, dtype = jnp.shape(leaf), _draw_dtype(jnp.result_type(leaf))
        if in_loops and _fits_a_loop(leaf):
            groups.setdefault((shape, dtype), []).append((index, leaf_key))
        else:
            z = _draw(leaf_key, shape, dtype, distribution, _traced_sharding(leaf))
            noise[index] = _scaled(leaf, scale, z)
    for (shape, dtype), members in groups.items():
        indices, group_keys = zip(*members, strict=True)
        keys_data = jax.random.key_data(jnp.stack(group_keys))
        draws = _group_draws(keys_data, shape, dtype, scale, distribution)
        for row, index in enumerate(indices):
            if distribution == "gaussian":
                noise[index] = draws[row].astype(jnp.result_type(leaves[index]))
            else:
                z = _signs(draws[row], shape, dtype)
                noise[index] = _scaled(leaves[index], scale, z)
    return jax.tree.unflatten(treedef, noise)


def _scaled(leaf, scale, z):
    """``scale * z`` in the draw dtype, cast to the leaf's dtype, placed like it."""
    return _placed_like(leaf, (scale.astype(z.dtype) * z).astype(jnp.result_type(leaf)))


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
    if _draws_in_loops(key) and all(
        _fits_a_loop(leaf) for leaf in jax.tree.leaves(tree) if is_noised(leaf)
    ):
        # Every leaf is drawn by a loop, which runs no iteration at scale 0;
        # unlike a cond, that leaves the updates to fuse with the zeros.
        return draw()

    def zeros():
        zeros_tree = jax.tree.map(_zeros_like, tree)
        return _varying(zeros_tree, jax.random.key_data(key), step, scale)

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
