"""The noise law written out plainly, the family's members, and one way to step them.

The tests compare the library with this file: ``reference_noise`` draws each
leaf with ``jax.random`` from its key, and ``reference_updates`` applies the
law of every member, update ``n`` adding ``sum_j c_j xi_{n-j}`` with
``xi_m = sigma(m) z_m`` and the pre-history ``xi_{-1}, ..., xi_{1-K}`` at
``sigma(0)``.
"""

import hashlib
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_antipgd as ap

SIGMA = 0.3


class Member(NamedTuple):
    """A member of the family: how to build it, and the law it must follow."""

    coefficients: tuple[float, ...]
    distribution: str = "gaussian"
    leaves: str = "all"
    store_noise: bool = True

    def make(self, noise_std=SIGMA, key=0):
        """The transform, built the way a user would build this member."""
        kwargs = dict(leaves=self.leaves, distribution=self.distribution)
        if len(self.coefficients) == 1:
            return ap.add_independent_noise(noise_std, key, **kwargs)
        kwargs["store_noise"] = self.store_noise
        if len(self.coefficients) == 2 and self.coefficients[0] == 1.0:
            correlation = -self.coefficients[1]
            return ap.add_anticorrelated_noise(
                noise_std, key, correlation=correlation, **kwargs
            )
        if self.coefficients == tuple(ap.fractional_coefficients(0.25, 8)):
            return ap.add_fractional_noise(noise_std, key, hurst=0.25, **kwargs)
        return ap.add_correlated_noise(
            noise_std, key, coefficients=self.coefficients, **kwargs
        )


FRACTIONAL = tuple(float(c) for c in ap.fractional_coefficients(0.25, 8))

# The one registry of the family, every mode and option represented.
MEMBERS = {
    "pgd": Member((1.0,)),
    "pgd_cyclic_rademacher": Member((1.0,), "rademacher", "cyclic"),
    "anti": Member((1.0, -1.0)),
    "anti_regenerated": Member((1.0, -1.0), store_noise=False),
    "anti_rademacher": Member((1.0, -1.0), "rademacher"),
    "partial_cyclic": Member((1.0, -0.5), leaves="cyclic"),
    "partial_cyclic_regenerated": Member(
        (1.0, -0.5), leaves="cyclic", store_noise=False
    ),
    "three_taps": Member((0.8, -0.5, 0.3)),
    "three_taps_regenerated": Member((0.8, -0.5, 0.3), "rademacher", store_noise=False),
    "fractional": Member(FRACTIONAL),
    "fractional_regenerated": Member(FRACTIONAL, store_noise=False),
}
CORRELATED = [name for name, m in MEMBERS.items() if len(m.coefficients) > 1]
ZERO_SUM = {
    "anti": (1.0, -1.0),
    "three_taps": (1.0, -0.5, -0.5),
    "four_taps": (1.0, -0.25, -0.25, -0.5),
}

TREE = {
    "w": jnp.linspace(-1.0, 1.0, 60).reshape(6, 10),
    "layers": [jnp.full((6, 10), 0.5), jnp.full((6, 10), -0.5)],
    "b": jnp.ones(10, jnp.bfloat16),
    "step": jnp.arange(3),
    "nothing": None,
}


def is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def floats(tree) -> list[Any]:
    return [x for x in jax.tree.leaves(tree) if is_float(x)]


def reference_leaf_noise(key, step, path, leaf, scale, distribution):
    """``scale * z_step`` of one leaf, drawn with ``jax.random`` from its key."""
    digest = hashlib.blake2b(jax.tree_util.keystr(path).encode(), digest_size=8)
    high, low = np.frombuffer(digest.digest(), dtype="<u4")
    leaf_key = jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(key, jnp.int32(step)), high), low
    )
    dtype = jnp.result_type(leaf)
    draw_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    shape = jnp.shape(leaf)
    if distribution == "gaussian":
        z = jax.random.normal(leaf_key, shape, draw_dtype)
    else:
        length = shape[-1] if shape else 1
        words = jax.random.bits(leaf_key, (*shape[:-1], -(-length // 32)), jnp.uint32)
        shifts = jnp.arange(32, dtype=jnp.uint32).reshape((1,) * words.ndim + (32,))
        bits = (words[..., None] >> shifts) & 1
        bits = bits.reshape(*words.shape[:-1], 32 * words.shape[-1])
        bits = bits[..., :length].reshape(shape)
        z = jnp.where(bits == 1, -1.0, 1.0).astype(draw_dtype)
    return (jnp.asarray(scale, draw_dtype) * z).astype(dtype)


def reference_noise(key, step, tree, scale, distribution="gaussian", cyclic=False):
    """``xi_step`` of every float leaf (None elsewhere); cyclic: leaf step mod L."""
    num_floats = len(floats(tree))
    position = iter(range(num_floats))

    def leaf_noise(path, leaf):
        if not is_float(leaf):
            return None
        if cyclic and next(position) != step % num_floats:
            return jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf))
        return reference_leaf_noise(key, step, path, leaf, scale, distribution)

    return jax.tree.map_with_path(leaf_noise, tree)


def reference_updates(member, key, schedule, grads):
    """The updates the law gives ``grads[0], grads[1], ...`` (a list of trees)."""
    key = jax.random.key(key) if isinstance(key, int) else key
    cyclic = member.leaves == "cyclic"

    def xi(m):
        scale = jnp.asarray(schedule(jnp.asarray(max(m, 0), jnp.int32)), jnp.float32)
        return reference_noise(key, m, grads[0], scale, member.distribution, cyclic)

    out = []
    for n, g in enumerate(grads):
        noises = [xi(n - j) for j in range(len(member.coefficients))]

        def leaf(u, *terms):
            if terms[0] is None:
                return u
            dtype = jnp.promote_types(u.dtype, terms[0].dtype)
            total = None
            for c, t in zip(member.coefficients, terms, strict=True):
                product = jnp.asarray(c, dtype) * t.astype(dtype)
                total = product if total is None else total + product
            return (u.astype(dtype) + total).astype(u.dtype)

        out.append(jax.tree.map(leaf, g, *noises))
    return out


def run(transform, params, num_steps, *, grads=None, jit=True):
    """Steps ``transform`` from ``init(params)``: the list of updates, and the state.

    Update ``i`` gets ``grads(i)`` (default: zeros like the params).
    """
    if grads is None:
        grads = lambda i: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    update = jax.jit(transform.update) if jit else transform.update
    state = transform.init(params)
    out = []
    for i in range(num_steps):
        updates, state = update(grads(i), state, params)
        out.append(updates)
    return out, state


def perturbations(transform, num_steps, size, dtype=jnp.float32):
    """What ``transform`` adds to zero updates of one leaf, steps x elements.

    Compiled as one ``lax.scan``: for the statistics, on large leaves.
    """
    params = jnp.zeros(size, dtype)

    def step(state, _):
        updates, state = transform.update(jnp.zeros_like(params), state, params)
        return state, updates

    @jax.jit
    def scan():
        return jax.lax.scan(step, transform.init(params), length=num_steps)[1]

    return np.asarray(scan(), np.float64)


def assert_equal_up_to_rounding(actual, expected, ulps=2):
    """Equal but for rounding: within ``ulps`` ulps of each leaf's largest value.

    For results of two separately compiled programs (the library against the
    reference, or the two store modes). The same expressions from the same
    draws, but XLA fuses each program on its own and may contract ``a * b + c``
    into one FMA in one and not in the other, which moves the last bit. A
    wrong draw, lag or scale misses by orders of magnitude more.
    """
    chex.assert_trees_all_equal_structs(actual, expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype
        if not jnp.issubdtype(e.dtype, jnp.floating):
            np.testing.assert_array_equal(a, e)
            continue
        e64 = np.asarray(e, np.float64)
        ulp = float(jnp.finfo(e.dtype).eps) * np.max(np.abs(e64), initial=0.0)
        np.testing.assert_allclose(
            np.asarray(a, np.float64), e64, rtol=0, atol=ulps * ulp
        )


def past_draws(state) -> list[Any]:
    """``xi_{n-1}, ..., xi_{n-K+1}`` of a stored state, read as documented.

    ``state.noise`` is a tree like the params whose float leaves are rings
    ``[K, *shape]``, slot ``m mod K`` holding ``xi_m``; ``[]`` when nothing is
    stored (one tap, or ``store_noise=False``).
    """
    num_taps = state.coefficients.shape[-1]
    if isinstance(state.noise, tuple) and not state.noise:
        return []
    n = int(state.count)
    is_stub = lambda x: x is None or isinstance(x, optax.MaskedNode)  # noqa: E731

    def draw(m):
        def take(ring):
            assert is_stub(ring) or ring.shape[0] == num_taps, ring.shape
            return ring if is_stub(ring) else ring[m % num_taps]

        return jax.tree.map(
            take,
            state.noise,
            is_leaf=is_stub,
        )

    return [draw(n - lag) for lag in range(1, num_taps)]
