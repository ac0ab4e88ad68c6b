"""``jax.random.bits`` of a threefry key, with the hash written out elementwise.

jax lowers the threefry hash on CPU to a loop of 5 iterations over the whole
output, which streams the counters through memory 5 times and runs on one
thread (a choice made for compile time: the loop body is emitted once). The
hash is 20 elementwise rounds of 32-bit adds, rotations and xors: written out,
each element is a pure function of its key and its flat index, the draw fuses
with its transform and with what reads it, and XLA splits the fusion over the
cores and the devices. The function below computes the same bits as
``jax.random.bits`` (the partitionable scheme, jax's default since 0.5):
``tests/test_draws.py`` pins them bit for bit, so a change in jax fails
loudly instead of changing the noise.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


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

    ``key`` is the raw uint32 data of a threefry key (or its two words, as
    arrays that broadcast against ``counters``); ``counters`` are uint32 flat
    indices (the high word of jax's 64-bit counter is 0 below 2**32);
    ``dtype`` is uint32 or uint64.
    """
    high, low = _hash(key, jnp.zeros_like(counters), counters)
    if jnp.dtype(dtype) == jnp.uint64:
        wide = lambda x: x.astype(jnp.uint64)  # noqa: E731
        return (wide(high) << np.uint64(32)) | wide(low)
    return high ^ low
