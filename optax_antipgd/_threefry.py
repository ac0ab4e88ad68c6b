"""``jax.random.bits`` of a threefry key, with the hash written out unrolled.

On CPU jax lowers the threefry hash to a loop of 5 iterations over the whole
output, which streams the counters through memory 5 times and keeps the hash
out of the fusions around it (a choice made for compile time: the loop body is
emitted once). The hash is 20 elementwise rounds; written out, it fuses with
the draw's transform and the update into one pass over memory. The function
below computes the same bits as ``jax.random.bits`` (the partitionable scheme,
jax's default since 0.5): ``tests/test_performance_paths.py`` pins them bit
for bit, so a change in jax fails loudly instead of changing the noise.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


# Counters are 64-bit flat indices, split into a high and a low word; this
# module hashes leaves small enough for the high word to be 0.
MAX_SIZE = 2**31


def _hash(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, ...]:
    """Threefry-2x32 (20 rounds) of the counter pairs ``(x0, x1)``."""
    k0, k1 = key[0], key[1]
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for group in range(5):
        for rotation in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = (x1 << np.uint32(rotation)) | (x1 >> np.uint32(32 - rotation))
            x1 = x0 ^ x1
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def bits(key: jax.Array, counters: jax.Array, dtype: Any) -> jax.Array:
    """The elements at flat indices ``counters`` of ``jax.random.bits(key, ., dtype)``.

    ``key`` is the raw uint32 data of a threefry key; ``counters`` are uint32
    flat indices below :data:`MAX_SIZE`; ``dtype`` is uint32 or uint64.
    """
    high, low = _hash(key, jnp.zeros_like(counters), counters)
    if jnp.dtype(dtype) == jnp.uint64:
        wide = lambda x: x.astype(jnp.uint64)  # noqa: E731
        return (wide(high) << np.uint64(32)) | wide(low)
    return high ^ low
