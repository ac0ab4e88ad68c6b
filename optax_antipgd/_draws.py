"""Drawing the noise: ``scale * z_m`` at the float leaves of a tree.

``z_m`` of a leaf is ``jax.random.normal(leaf_key, shape)`` (or a Rademacher
sign per element, from ``jax.random.bits``), bit for bit, with ``leaf_key``
the leaf's stream at step ``m`` (:func:`optax_antipgd._keys.leaf_keys`). It is
drawn in float32 (float64 for float64 leaves), scaled, then cast to the leaf's
dtype: ``scale * z_m`` rounded once, in every program.

There is one way the draw runs. For threefry keys (jax's default) the hash
is the counter-based one of ``jax.random`` written out elementwise
(``_threefry``): each element is a pure function of its key and its flat
index, so a draw is one elementwise fusion that XLA splits over the cores and
over the devices (the counters carry the leaf's sharding; no collective).
On one device, leaves of one shape (for normal draws, of one size: a leaf's
draw is the flat draw of its size, reshaped) are drawn together, a row per
leaf, in one fusion. Under a trace that fusion is the result of a
conditional (:func:`_every_row`), which skips it at scale 0 and computes it
once, into memory; the scaling fuses into what reads it. Keys of other
impls (rbg, unsafe_rbg) draw each leaf with ``jax.random``.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_antipgd import _cond
from optax_antipgd import _keys
from optax_antipgd import _threefry
from optax_antipgd import _trees

_BITS_PER_WORD = 32


def draw_dtype(dtype: Any) -> Any:
    """The dtype a leaf of ``dtype`` draws its noise in."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def normal_from_bits(bits: jax.Array, dtype: Any) -> jax.Array:
    """``jax.random.normal`` of the key whose ``jax.random.bits`` are ``bits``.

    The same operations in the same order as jax's ``uniform`` on
    ``[nextafter(-1, 0), 1)`` followed by ``sqrt(2) * erf_inv``, so the result
    is bit for bit the same (``tests/test_draws.py`` pins it).
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


def _words_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the packed words of a Rademacher draw of ``shape``."""
    length = shape[-1] if shape else 1
    return (*shape[:-1], -(-length // _BITS_PER_WORD))


def _signs(words: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """+-1 from packed bits: bit ``j`` of word ``w`` is element ``32w + j``.

    ``words`` has a leading axis of rows: ``(rows, *_words_shape(shape))``.
    """
    length = shape[-1] if shape else 1
    shifts = jnp.arange(_BITS_PER_WORD, dtype=jnp.uint32).reshape(
        (1,) * words.ndim + (_BITS_PER_WORD,)
    )
    bits = (words[..., None] >> shifts) & 1
    bits = bits.reshape(*words.shape[:-1], words.shape[-1] * _BITS_PER_WORD)
    bits = bits[..., :length]
    signs = jnp.where(bits == 1, -1.0, 1.0).astype(dtype)
    return signs.reshape(words.shape[0], *shape)


def _row_sharding(sharding: Any, ndim: int) -> Any:
    """The sharding of ``(rows, *leaf)`` for leaves sharded like ``sharding``."""
    if sharding is None:
        return None
    spec = (*sharding.spec, *(None,) * (ndim - len(sharding.spec)))
    return NamedSharding(sharding.mesh, P(None, *spec))


def _hashed_bits(keys, shape, word, sharding):
    """``jax.random.bits(key, shape, word)`` of each row's threefry key, stacked.

    ``keys`` is uint32[rows, 2]. Every element hashes its own flat index, so
    the draw is elementwise: it fuses with what reads it and is split over the
    cores, and with ``sharding`` each device hashes only its block.
    """
    full = (keys.shape[0], *shape)
    out_sharding = _row_sharding(sharding, len(shape))
    flat = jnp.zeros(full, jnp.uint32, out_sharding=out_sharding)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = jax.lax.broadcasted_iota(
            jnp.uint32, full, axis + 1, out_sharding=out_sharding
        )
        flat = flat + index * np.uint32(stride)
        stride *= shape[axis]
    key_shape = (keys.shape[0],) + (1,) * len(shape)
    key = (keys[:, 0].reshape(key_shape), keys[:, 1].reshape(key_shape))
    return _threefry.bits(key, flat, word)


def _random_bits(keys, impl, shape, word, sharding):
    """The same as :func:`_hashed_bits`, by ``jax.random`` (any key impl)."""
    rows = [
        jax.random.bits(
            jax.random.wrap_key_data(keys[row], impl=impl),
            shape,
            word,
            out_sharding=sharding,
        )
        for row in range(keys.shape[0])
    ]
    return jnp.stack(rows)


def _bits(keys, impl, shape, word, sharding):
    """``jax.random.bits(key, shape, word)`` of each row's key: ``(rows, *shape)``."""
    if str(impl) == _keys.BATCHED_IMPL and math.prod(shape) < 2**32:
        return _hashed_bits(keys, shape, word, sharding)
    # Other impls, and leaves too large for 32-bit counters.
    return _random_bits(keys, impl, shape, word, sharding)


def _words_sharding(sharding, ndim):
    """The sharding of a Rademacher draw's words: the last axis kept whole."""
    if sharding is None:
        return None
    spec = (*sharding.spec, *(None,) * (ndim - len(sharding.spec)))
    return NamedSharding(sharding.mesh, P(*spec[:-1], None))


def _random(keys, impl, shape, dtype, distribution, sharding):
    """What each row's key draws before scaling: ``(rows, ...)``.

    Gaussian: ``z`` in ``dtype`` (float32 or float64), ``(rows, *shape)``.
    Rademacher: the packed sign bits, 32 to a word along the last axis, which
    the words keep whole, so unpacking them needs no communication.
    """
    if distribution == "gaussian":
        if math.prod(shape) == 0:
            return jnp.zeros((keys.shape[0], *shape), dtype)
        word = jnp.uint64 if dtype == jnp.float64 else jnp.uint32
        return normal_from_bits(_bits(keys, impl, shape, word, sharding), dtype)
    words_shape = _words_shape(shape)
    if math.prod(words_shape) == 0:
        return jnp.zeros((keys.shape[0], *words_shape), jnp.uint32)
    words_sharding = _words_sharding(sharding, len(shape))
    return _bits(keys, impl, words_shape, jnp.uint32, words_sharding)


def _scaled(random, scales, shape, dtype, distribution, sharding):
    """``scales[r] * z`` of each row from what :func:`_random` drew, in ``dtype``."""
    scales = scales.astype(dtype).reshape((-1,) + (1,) * len(shape))
    if distribution == "gaussian":
        return scales * random
    noise = scales * _signs(random, shape, dtype)
    if sharding is not None and _words_sharding(sharding, len(shape)) != sharding:
        noise = jax.reshard(noise, _row_sharding(sharding, len(shape)))
    return noise


def _varying(value: Any, *sources: jax.Array) -> Any:
    """``value``, varying over the shard_map axes that any of ``sources`` varies over.

    Inside shard_map, a key that differs per device makes a draw vary over the
    mesh axes; zeros standing in for it must vary alike.
    """
    axes = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in sources))
    axes -= jax.typeof(value).manual_axis_type.varying
    if not axes:
        return value
    return jax.lax.pcast(value, tuple(sorted(axes)), to="varying")


def _traced_sharding(leaf: Any) -> NamedSharding | None:
    """A traced leaf's sharding where the trace knows it (explicit mesh axes)."""
    if not isinstance(leaf, jax.core.Tracer):
        return None
    sharding = jax.typeof(leaf).sharding
    if isinstance(sharding, NamedSharding) and any(sharding.spec):
        return sharding
    return None


def spread_sharding(leaf: Any) -> Any:
    """The sharding of a concrete leaf spread over several devices, else None."""
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
        if len(leaf.sharding.device_set) > 1:
            return leaf.sharding
    return None


def _noise_lists(key, steps, scales, leaves, *, paths, distribution, cyclic):
    """``noise[s][i]``: ``scales[s] * z_{steps[s]}`` of float leaf ``i``.

    Rows of one shape (Gaussian: one size) and draw dtype are drawn together
    (on one device; on several, each leaf alone, with its sharding). With
    ``cyclic``, float leaf ``step mod L`` alone draws at each step: a group
    draws one row per step, the active member's (none when it has no active
    member), and each member keeps it where it is the active one.
    """
    impl = jax.random.key_impl(key)
    num_leaves = len(leaves)
    leaf_keys = [
        jax.random.key_data(_keys.leaf_keys(jax.random.fold_in(key, step), paths))
        for step in steps
    ]  # [step] -> uint32[leaves, key size]
    stack = jax.device_count() == 1
    groups = {}
    for index, leaf in enumerate(leaves):
        dtype = draw_dtype(jnp.result_type(leaf))
        shape = jnp.shape(leaf)
        if stack and distribution == "gaussian":
            # A normal draw counts the elements in row-major order: a leaf's
            # draw is the flat draw of its size, reshaped. Leaves of one size
            # (a 1x1 convolution from 64 to 256 channels and back) share it.
            shape = (math.prod(shape),)
        group = (shape, dtype, None if stack else index)
        groups.setdefault(group, []).append(index)
    noise = [[None] * num_leaves for _ in steps]
    for (shape, dtype, _), members in groups.items():
        options = dict(
            shape=shape,
            dtype=dtype,
            distribution=distribution,
            sharding=_traced_sharding(leaves[members[0]]),
        )
        random = functools.partial(_random, impl=impl, **options)
        scaled = functools.partial(_scaled, **options)
        keys = [k[jnp.asarray(members)] for k in leaf_keys]  # [step][member]
        if cyclic:
            active = [jnp.mod(step, num_leaves) for step in steps]
            drawn = _active_rows(random, scaled, keys, scales, active, members)
        else:
            drawn = _every_row(random, scaled, keys, scales)
        for s, row in enumerate(drawn):
            for index, value in zip(members, row, strict=True):
                noise[s][index] = value.reshape(jnp.shape(leaves[index]))
    return [
        [
            value.astype(jnp.result_type(leaf))
            for value, leaf in zip(row, leaves, strict=True)
        ]
        for row in noise
    ]


def _zeros_like(fn, *args):
    """What ``fn(*args)`` returns, all zero and sharded alike, not computed."""
    out = jax.eval_shape(fn, *args)
    sharding = out.sharding if isinstance(out.sharding, NamedSharding) else None
    if sharding is not None and not any(sharding.spec):
        sharding = None
    zeros = jnp.zeros(out.shape, out.dtype, out_sharding=sharding)
    return _varying(zeros, *args)


def _is_zero(scale):
    """``scale == 0``, which XLA keeps: a conditional on it is not folded away.

    A constant scale (or one XLA can compute from constants) would make the
    predicate a constant, and XLA would drop the conditional and fuse the
    draw into its readers after all; the barrier hides the value.
    """
    return jax.lax.optimization_barrier(jnp.asarray(scale)) == 0


def _every_row(random, scaled, keys, scales):
    """``[step][member]``: every member's draw at every step.

    The random part of a step's draw (``z``; Rademacher: the packed words),
    for all the members at once, is the result of a conditional that skips
    it when the scale is 0 (a schedule that has switched the noise off costs
    no draws); the scaling fuses into what reads it. A conditional's result
    is computed once, into memory. Fused into its readers instead, a draw is
    computed again in each: an Anti-PGD step reads its new draw twice (the
    update and the stored noise), XLA counts the hash's integer rounds as
    cheap, and each element was hashed 3 times (a training step of a
    1.9M-param MLP: 12.1 ms against about 10 ms, 2 cores); XLA also
    reassociated the scale into the normal transform's last product, so the
    noise was not ``scale * z`` to the last bit. The conditional also means
    that the group is one fusion, not a loop over its rows to keep XLA from
    fusing the transform's tail into each row's reader (a PGD step of 160
    leaves of 250x250: 44 ms against 59 ms, compiled in 2.5 s against 2.2
    s). (One fusion over all the steps, sliced per step, was slower on CPU: a
    ``store_noise=False`` Anti-PGD step of 10M float32 took 273 ms against
    53 ms, 2 cores.)
    """
    num_members = keys[0].shape[0]

    def one(step_keys, scale):
        step_scales = jnp.full((num_members,), scale)
        traced = isinstance(scale, jax.core.Tracer)
        if not traced and scale == 0:
            return _zeros_like(
                lambda k, sc: scaled(random(k), sc), step_keys, step_scales
            )
        if not (traced or isinstance(step_keys, jax.core.Tracer)):
            # Outside a trace a cond would compile its branches at every call.
            return scaled(random(step_keys), step_scales)
        zeros = functools.partial(_zeros_like, random)
        z = _cond.cond_all(_is_zero(scale), zeros, random, step_keys)
        return scaled(z, step_scales)

    drawn = [one(k, sc) for k, sc in zip(keys, scales, strict=True)]
    return [[rows[m] for m in range(num_members)] for rows in drawn]


def _active_rows(random, scaled, keys, scales, active, members):
    """``[step][member]`` with cyclic leaves: only the active member draws.

    One row per step, the active member's key (none when the group has no
    active member, and nothing is drawn when no row has a scale); each member
    keeps it where it is the active one, and is zero elsewhere.
    """
    hits = [jnp.asarray(members) == a for a in active]  # [step] -> bool[members]
    row_keys = jnp.stack([k[jnp.argmax(h)] for k, h in zip(keys, hits, strict=True)])
    row_scales = jnp.stack(
        [jnp.where(jnp.any(h), sc, 0) for h, sc in zip(hits, scales, strict=True)]
    )
    z = _cond.cond_all(
        jnp.all(_is_zero(row_scales)),
        functools.partial(_zeros_like, random),
        random,
        row_keys,
    )
    drawn = scaled(z, row_scales)
    return [
        [jnp.where(h[m], drawn[s], 0) for m in range(len(members))]
        for s, h in enumerate(hits)
    ]


@functools.lru_cache(maxsize=32)
def _spread_draw(paths, distribution, cyclic, shardings, num_steps):
    """The draw compiled with the leaves' ``shardings``, once per tree and count."""
    draw = functools.partial(
        _noise_lists, paths=list(paths), distribution=distribution, cyclic=cyclic
    )
    return jax.jit(draw, out_shardings=[list(shardings)] * num_steps)


def tree_noise(
    key: jax.Array,
    steps: list[Any],
    tree: Any,
    scales: list[Any],
    distribution: str,
    cyclic: bool = False,
) -> list[Any]:
    """``scales[s] * z_{steps[s]}`` at every float leaf of ``tree``, for each ``s``.

    Returns one tree per step, ``None`` at the leaves that are not float;
    ``None`` and ``optax.MaskedNode`` nodes are kept. With ``cyclic`` only
    float leaf ``step mod L`` (tree order) draws; the others are zero. Each
    noise leaf has the dtype and the sharding of its leaf: a concrete leaf
    spread over several devices is drawn in place, each device computing its
    own block.
    """
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    floats = [
        index
        for index, (path, leaf) in enumerate(paths_leaves)
        if _trees.is_float(leaf, path)
    ]
    leaves = [paths_leaves[index][1] for index in floats]
    paths = [paths_leaves[index][0] for index in floats]
    trees = [[None] * len(paths_leaves) for _ in steps]
    if leaves:
        steps = [jnp.asarray(step, jnp.int32) for step in steps]
        shardings = tuple(spread_sharding(leaf) for leaf in leaves)
        if any(shardings):
            # Concrete params spread over devices (an eager init): compile the
            # draw with the leaves' shardings, so that each device draws only
            # its block instead of the whole leaf being drawn on one device.
            draw = _spread_draw(
                tuple(paths), distribution, cyclic, shardings, len(steps)
            )
        else:
            draw = functools.partial(
                _noise_lists, paths=paths, distribution=distribution, cyclic=cyclic
            )
        values = draw(key, steps, list(scales), leaves)
        for tree_values, step_values in zip(trees, values, strict=True):
            for index, value in zip(floats, step_values, strict=True):
                tree_values[index] = value
    return [jax.tree.unflatten(treedef, values) for values in trees]


def keep_active(noise: Any, step: jax.Array, cyclic: Any) -> Any:
    """``noise`` where ``cyclic`` is false; else only float leaf ``step mod L`` of it.

    ``cyclic`` may be traced: the leaves rule of a state read as data.
    """
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(noise)
    floats = [i for i, (path, leaf) in enumerate(paths_leaves) if leaf is not None]
    active = jnp.mod(step, max(len(floats), 1))
    values = [leaf for _, leaf in paths_leaves]
    for position, index in enumerate(floats):
        keep = jnp.logical_or(jnp.logical_not(cyclic), active == position)
        values[index] = jnp.where(keep, values[index], 0).astype(values[index].dtype)
    return jax.tree.unflatten(treedef, values)
