"""Drawing the noise: ``scale * z_m`` at the float leaves of a tree.

``z_m`` of a leaf is standard normal or Rademacher, drawn from the leaf's key
(:func:`optax_antipgd._keys.leaf_keys`) in float32 (float64 for float64
leaves), scaled, then cast to the leaf's dtype. With ``leaves="cyclic"`` only
float leaf ``m mod L`` draws; the others are zero.

How the draw runs never changes a bit of it. On one CPU device with threefry
keys (jax's default) same-shaped leaves are drawn in one loop over
cache-sized chunks with the threefry hash written out (``_threefry``);
elsewhere (GPU, several devices, other key impls) each leaf draws with
``jax.random``, with its leaf's sharding. A scale of 0 draws nothing and gives
exact zeros.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_antipgd import _keys
from optax_antipgd import _threefry
from optax_antipgd import _trees

_BITS_PER_WORD = 32


def draw_dtype(dtype: Any) -> Any:
    """The dtype a leaf of ``dtype`` draws its noise in."""
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


def normal_from_bits(bits: jax.Array, dtype: Any) -> jax.Array:
    """``jax.random.normal`` of the key whose ``jax.random.bits`` are ``bits``.

    The same operations in the same order as jax's ``uniform`` on
    ``[nextafter(-1, 0), 1)`` followed by ``sqrt(2) * erf_inv``, so the result
    is bit for bit the same (``tests/test_draws.py`` pins it). Used where the
    bits are hashed by ``_threefry``.
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


def _traced_sharding(leaf: Any) -> NamedSharding | None:
    """A traced leaf's sharding where the trace knows it (explicit mesh axes)."""
    if not isinstance(leaf, jax.core.Tracer):
        return None
    sharding = jax.typeof(leaf).sharding
    if isinstance(sharding, NamedSharding) and any(sharding.spec):
        return sharding
    return None


def _spread_sharding(leaf: Any) -> Any:
    """The sharding of a concrete leaf spread over several devices, else None."""
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
        if len(leaf.sharding.device_set) > 1:
            return leaf.sharding
    return None


def draws_in_loops(key: jax.Array) -> bool:
    """Whether same-shaped leaves draw their noise in one loop (:func:`_group_draws`).

    Where jax lowers threefry to a loop over the whole output (CPU) and no
    sharding is possible (one device): a stacked draw has one sharding, and
    same-shaped leaves sharded differently would need collectives to be cut
    out of it. Elsewhere each leaf draws with ``jax.random``.
    """
    return (
        _keys.has_batched_impl(key)
        and jax.config.jax_threefry_partitionable
        and jax.default_backend() == "cpu"
        and jax.device_count() == 1
    )


# Elements one iteration of a draw loop hashes: a chunk stays in cache, and is
# large enough for the loop's overhead not to show. (XLA CPU runs a loop body
# on one thread, as it does jax's own threefry loop; benchmarks/RESULTS.md
# weighs that against per-leaf fusions, which compile once per leaf.)
CHUNK = 2**16


def _group_draws(keys, shape, dtype, scale, distribution):
    """``scale * z`` of same-shaped leaves, stacked, from one loop over their counters.

    ``keys`` are the leaves' raw keys, stacked. Each iteration hashes a
    cache-sized chunk of one leaf's counters and transforms it, all in one
    fusion (``_threefry``); the loop's output is the one buffer the draw is
    written to, so noise read twice (the update, the stored state) is hashed
    once, and the hash is compiled once per group, not once per leaf. When
    ``scale`` is 0 the loop runs no iteration. Returns scaled normals of
    ``dtype``, or for Rademacher the packed words (unscaled).

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
            values = scale.astype(dtype) * normal_from_bits(values, dtype)
        return jax.lax.dynamic_update_index_in_dim(draws, values, index, 0)

    total = len(keys) * num_chunks
    zeros = _varying(jnp.zeros((total, chunk), out_dtype), keys, scale)
    draws = jax.lax.fori_loop(0, jnp.where(scale == 0, 0, total), draw_chunk, zeros)
    draws = draws.reshape(len(keys), num_chunks * chunk)[:, :size]
    return draws.reshape(len(keys), *out_shape)


def _fits_a_loop(leaf: Any) -> bool:
    """Whether a leaf is small enough for the loop's 32-bit counters."""
    return math.prod(jnp.shape(leaf)) < _threefry.MAX_SIZE


def _chunk_size(size: int) -> int:
    """Elements per iteration: the largest divisor of ``size`` up to CHUNK.

    A divisor makes the stacked chunks exactly the leaves, with no padding to
    slice off (a slice is one more pass over memory). Sizes with no divisor
    between CHUNK / 2 and CHUNK (primes) are padded up to whole chunks.
    """
    if size <= CHUNK:
        return size
    for chunk in range(CHUNK, CHUNK // 2, -1):
        if size % chunk == 0:
            return chunk
    return CHUNK


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


def _zeros(leaf: Any) -> jax.Array:
    return jnp.zeros(
        jnp.shape(leaf), jnp.result_type(leaf), out_sharding=_traced_sharding(leaf)
    )


def _scaled(leaf, scale, z):
    """``scale * z`` in the draw dtype, cast to the leaf's dtype."""
    return (scale.astype(z.dtype) * z).astype(jnp.result_type(leaf))


def _noise_list(key, step, leaves, *, paths, scale, distribution, cyclic):
    """The noise of the float ``leaves`` (a list), drawn at ``step``."""
    step_key = jax.random.fold_in(key, step)
    keys = _keys.leaf_keys(step_key, paths)
    # The float leaf that draws at this step when only one does.
    active = jnp.mod(step, len(leaves)) if cyclic else None
    noise = [None] * len(leaves)
    loops = draws_in_loops(key)
    groups = {}
    for index, leaf in enumerate(leaves):
        if loops and _fits_a_loop(leaf):
            shape, dtype = jnp.shape(leaf), draw_dtype(jnp.result_type(leaf))
            groups.setdefault((shape, dtype), []).append(index)
    for (shape, dtype), members in groups.items():
        keys_data = jax.random.key_data(jnp.stack([keys[i] for i in members]))
        if cyclic:
            # Draw the active member alone (none if it is in another group) and
            # select it per member: no group-sized buffer of zeros to write.
            at = jnp.asarray(members) == active
            row = jnp.argmax(at)
            group_scale = jnp.where(jnp.any(at), scale, jnp.zeros_like(scale))
            drawn = _group_draws(
                keys_data[row][None], shape, dtype, group_scale, distribution
            )
            for position, index in enumerate(members):
                value = _from_draw(drawn[0], leaves[index], group_scale, distribution)
                noise[index] = jnp.where(at[position], value, jnp.zeros_like(value))
        else:
            drawn = _group_draws(keys_data, shape, dtype, scale, distribution)
            for position, index in enumerate(members):
                noise[index] = _from_draw(
                    drawn[position], leaves[index], scale, distribution
                )
    alone = [index for index in range(len(leaves)) if noise[index] is None]
    if alone:
        drawn = _drawn_alone(keys, leaves, alone, scale, distribution, active)
        for index, value in zip(alone, drawn, strict=True):
            noise[index] = value
    return noise


def _from_draw(drawn, leaf, scale, distribution):
    """A leaf's noise from its row of a group draw (normals, or packed words)."""
    if distribution == "gaussian":
        return drawn.astype(jnp.result_type(leaf))
    z = _signs(drawn, jnp.shape(leaf), draw_dtype(jnp.result_type(leaf)))
    return _scaled(leaf, scale, z)


def _drawn_alone(keys, leaves, indices, scale, distribution, active):
    """The leaves at ``indices`` drawn one by one with ``jax.random``.

    Nothing is drawn when ``scale`` is 0 (a ``lax.cond`` over them all), and
    with ``active`` given (cyclic leaves) only that leaf draws (a
    ``lax.switch``).
    """

    def draw(index):
        leaf = leaves[index]
        dtype = draw_dtype(jnp.result_type(leaf))
        z = _draw(
            keys[index], jnp.shape(leaf), dtype, distribution, _traced_sharding(leaf)
        )
        return _scaled(leaf, scale, z)

    def zeros():
        zeros = [_zeros(leaves[index]) for index in indices]
        return _varying(zeros, jax.random.key_data(keys[0]), scale)

    if active is None:
        if not isinstance(scale, jax.core.Tracer):
            # Outside a trace, cond would compile its fresh branches at every call.
            return [draw(index) for index in indices] if scale != 0 else zeros()
        return jax.lax.cond(scale == 0, zeros, lambda: [draw(i) for i in indices])

    def one(position):
        values = zeros()
        values[position] = draw(indices[position])
        return values

    # Branch i draws indices[i]; the last branch draws nothing.
    branch = jnp.argmax(jnp.asarray(indices + [active], jnp.int32) == active)
    branch = jnp.where(scale == 0, len(indices), branch)
    branches = [functools.partial(one, p) for p in range(len(indices))] + [zeros]
    return jax.lax.switch(branch, branches)


@functools.lru_cache(maxsize=32)
def _spread_draw(paths, distribution, cyclic, shardings):
    """The draw compiled with ``shardings``, once for every step it draws."""
    draw = functools.partial(
        _noise_list, paths=list(paths), distribution=distribution, cyclic=cyclic
    )
    return jax.jit(draw, out_shardings=list(shardings))


def tree_noise(
    key: jax.Array,
    step: jax.Array,
    tree: Any,
    scale: jax.Array,
    distribution: str,
    cyclic: bool = False,
) -> Any:
    """``scale * z_step`` at every float leaf of ``tree``, ``None`` elsewhere.

    With ``cyclic``, only float leaf ``step mod L`` (tree order) draws; the
    others are zero. ``None`` and ``optax.MaskedNode`` nodes are kept. Each
    noise leaf has the dtype and the sharding of its leaf: a concrete leaf
    spread over several devices is drawn in place, each device computing its
    own block. When ``scale`` is 0 nothing is drawn and the noise is exactly
    zero.
    """
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    floats = [
        index
        for index, (path, leaf) in enumerate(paths_leaves)
        if _trees.is_float(leaf, path)
    ]
    leaves = [paths_leaves[index][1] for index in floats]
    paths = [paths_leaves[index][0] for index in floats]
    noise = [None] * len(paths_leaves)
    if leaves:
        shardings = tuple(_spread_sharding(leaf) for leaf in leaves)
        if any(shardings):
            # Concrete params spread over devices (an eager init): compile the
            # draw with the leaves' shardings, so that each device draws only
            # its block instead of the whole leaf being drawn on one device.
            draw = _spread_draw(tuple(paths), distribution, cyclic, shardings)
        else:
            draw = functools.partial(
                _noise_list, paths=paths, distribution=distribution, cyclic=cyclic
            )
        values = draw(key, step, leaves, scale=scale)
        for index, value in zip(floats, values, strict=True):
            noise[index] = value
    return jax.tree.unflatten(treedef, noise)
