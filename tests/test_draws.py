"""The draw is the per-leaf definition, bit for bit, however it is run.

The noise law of a leaf: ``z_m = draw(fold_in(fold_in(fold_in(key, m), high),
low))`` with ``(high, low)`` the blake2b digest of the leaf's ``keystr`` path
and ``draw`` ``jax.random.normal`` (or Rademacher signs from
``jax.random.bits``). The library writes threefry's hash out elementwise
(``_threefry``) and stacks same-shaped leaves and several steps into one
fusion on one device; on several devices each leaf draws alone, with its
sharding. These tests pin that neither changes one bit, under the suite's
compiler settings and at XLA's default optimization level.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_antipgd as ap
from optax_antipgd import _draws
from optax_antipgd import _threefry
from tests._law import reference_noise


def _tree():
    """Groups of same-shaped leaves, lone leaves, odd row lengths, low precision."""
    return {
        "scalar": jnp.zeros(()),
        "vector": jnp.zeros((33,)),
        "prime": jnp.zeros((197,)),
        "empty": jnp.zeros((0, 5)),
        "layers": [jnp.zeros((7, 65)) for _ in range(3)],
        "pair": (jnp.zeros((3, 2, 31)), jnp.zeros((3, 2, 31))),
        "scalars": [jnp.zeros(()), jnp.zeros(())],
        "bf16": [jnp.zeros((4, 40), jnp.bfloat16) for _ in range(2)],
        "f16": [jnp.zeros((4, 40), jnp.float16), jnp.zeros((4, 40), jnp.float16)],
        "mixed": [jnp.zeros((4, 40), jnp.float32)],
        "int": jnp.zeros((4,), jnp.int32),
        "none": None,
    }


def _bits(x):
    """The bytes of ``x``, with -0.0 as +0.0 (a zero scale times z < 0)."""
    x = np.atleast_1d(np.asarray(x))
    if x.dtype.kind not in "iub":
        x = np.where(x == 0, np.zeros_like(x), x)
    return x.view(np.uint8)


def _assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(_bits(a), _bits(e))


_KEYS = {
    "threefry": lambda: jax.random.key(3),
    "rbg": lambda: jax.random.key(3, impl="rbg"),
    "unsafe_rbg": lambda: jax.random.key(3, impl="unsafe_rbg"),
}
STEPS = (0, -1, 2**31 - 1)


def _draw(tree, distribution, cyclic=False):
    """The library's draw of ``tree`` at every step of STEPS, in one program."""
    return jax.jit(
        lambda key, scales: _draws.tree_noise(
            key, [jnp.int32(s) for s in STEPS], tree, scales, distribution, cyclic
        )
    )


def _reference(tree, distribution, cyclic=False):
    """The definition, eagerly: ``z`` from ``jax.random``, then one product.

    Not jitted: in one fused kernel XLA reassociates the scale with the
    normal transform's last product, and the noise is then not ``scale * z``
    to the last bit.
    """
    return lambda key, scales: [
        reference_noise(key, s, tree, scale, distribution, cyclic)
        for s, scale in zip(STEPS, scales, strict=True)
    ]


# Threefry keys take the written-out hash, stacked on one device or leaf by
# leaf on several; other impls draw with jax.random, the same on both.
CASES = [
    *(
        (devices, "threefry", distribution, cyclic)
        for devices in (1, 8)
        for distribution in ("gaussian", "rademacher")
        for cyclic in (False, True)
    ),
    (1, "rbg", "gaussian", False),
    (8, "rbg", "rademacher", True),
    (1, "unsafe_rbg", "gaussian", False),
]


@pytest.mark.parametrize(("devices", "impl", "distribution", "cyclic"), CASES)
def test_tree_noise_is_bit_identical_to_the_per_leaf_definition(
    devices, impl, distribution, cyclic, monkeypatch
):
    # One device: same-shaped leaves drawn together; several: each leaf alone.
    monkeypatch.setattr(jax, "device_count", lambda: devices)
    key, tree = _KEYS[impl](), _tree()
    scales = [jnp.float32(s) for s in (0.3, 0.0, 2.5)]
    _assert_bitwise_equal(
        _draw(tree, distribution, cyclic)(key, scales),
        _reference(tree, distribution, cyclic)(key, scales),
    )


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("scale", [0.3, "traced"])
def test_a_vmapped_draw_is_the_definition_bit_for_bit(distribution, scale):
    # Vmapped over seeds, the draw must stay the result of one conditional
    # (a select would fuse it into its readers, where XLA reassociates the
    # scale); a concrete scale and a traced one take the two predicates.
    tree, seeds = _tree(), jnp.arange(3)

    def draw(seed, sigma):
        sigma = jnp.float32(0.3) if scale != "traced" else sigma
        key = jax.random.key(seed)
        return _draws.tree_noise(key, [jnp.int32(5)], tree, [sigma], distribution)[0]

    drawn = jax.jit(jax.vmap(draw))(seeds, jnp.full(3, 0.3, jnp.float32))
    for row, seed in enumerate(seeds):
        expected = reference_noise(
            jax.random.key(seed), 5, tree, jnp.float32(0.3), distribution
        )
        _assert_bitwise_equal(jax.tree.map(lambda x, r=row: x[r], drawn), expected)


def test_cyclic_noise_draws_one_leaf_per_step_in_tree_order():
    tree = {"a": jnp.zeros(3), "b": [jnp.zeros((2, 2))] * 2, "c": jnp.zeros(0)}
    num_floats = 4
    steps = list(range(-num_floats, num_floats))
    noise = jax.jit(
        lambda key: _draws.tree_noise(
            key, steps, tree, [jnp.float32(1.0)] * len(steps), "gaussian", True
        )
    )(jax.random.key(0))
    for step, drawn in zip(steps, noise, strict=True):
        nonzero = [bool(jnp.any(x != 0)) for x in jax.tree.leaves(drawn)]
        # The empty leaf (float leaf 3) cannot show its draw.
        expected = [i == step % num_floats and i != 3 for i in range(num_floats)]
        assert nonzero == expected, step


def test_a_zero_scale_gives_exact_zeros():
    noise = jax.jit(
        lambda key: _draws.tree_noise(
            key, [jnp.int32(3)], _tree(), [jnp.float32(0.0)], "gaussian"
        )[0]
    )(jax.random.key(0))
    for leaf in jax.tree.leaves(noise):
        np.testing.assert_array_equal(leaf, 0)


def test_the_draw_is_bit_identical_at_xlas_default_optimization_level():
    # The suite compiles without LLVM's optimizations (conftest.py); the
    # noise must not depend on that. A fresh interpreter at XLA's defaults
    # (float64 too: x64 is process-wide), with 8 CPU devices for the
    # per-leaf path.
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from tests import test_draws as t
        assert jax.device_count() == 8
        for tree in (t._tree(), [jnp.zeros((3, 33), jnp.float64)] * 3):
            scales = [jnp.asarray(s, jnp.float64) for s in (0.3, 0.0, 2.5)]
            for devices in (1, 8):
                jax.device_count = lambda devices=devices: devices
                for distribution in ("gaussian", "rademacher"):
                    key = t._KEYS["threefry"]()
                    t._assert_bitwise_equal(
                        t._draw(tree, distribution)(key, scales),
                        t._reference(tree, distribution)(key, scales),
                    )
        print("ok")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = os.environ.get("XLA_FLAGS", "").replace(
        "--xla_backend_optimization_level=0", ""
    )
    env = {
        **os.environ,
        "JAX_ENABLE_X64": "1",
        "PYTHONPATH": root,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=8".strip(),
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", [(), (1,), (5, 33), (2, 3, 64), (0, 4)])
def test_written_out_threefry_is_jax_random_bits(seed, shape):
    key = jax.random.fold_in(jax.random.key(seed), 11)
    size = int(np.prod(shape))
    counters = jax.lax.iota(jnp.uint32, size).reshape(shape)
    bits = jax.jit(_threefry.bits, static_argnums=2)
    expected = jax.random.bits(key, shape, jnp.uint32)
    _assert_bitwise_equal(
        bits(jax.random.key_data(key), counters, jnp.uint32), expected
    )
    # Any window of the counters: the elements at those flat indices.
    window = jnp.arange(size // 2, size, dtype=jnp.uint32)
    _assert_bitwise_equal(
        bits(jax.random.key_data(key), window, jnp.uint32),
        expected.reshape(-1)[size // 2 :],
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(), (1,), (5, 33), (2, 3, 64)])
def test_normal_from_bits_is_jax_random_normal(seed, shape):
    key = jax.random.key(seed)
    bits = jax.random.bits(key, shape, jnp.uint32)
    _assert_bitwise_equal(
        _draws.normal_from_bits(bits, jnp.float32),
        jax.random.normal(key, shape, jnp.float32),
    )


def _switch_off_run(opt, num_steps=6):
    params = {"w": jnp.ones((3, 40)), "b": jnp.ones((40,))}
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    state = opt.init(params)
    step = jax.jit(opt.update)
    emitted = []
    for _ in range(num_steps):
        updates, state = step(grads, state, params)
        emitted.append(updates)
    return grads, emitted, state


# sigma(0) = sigma(1) = 0.2, sigma(n) = 0 from n = 2 on.
_SWITCH_OFF = optax.piecewise_constant_schedule(0.2, {2: 0.0})


@pytest.mark.parametrize("store_noise", [True, False])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_switched_off_anti_pgd_cancels_the_last_noise_then_adds_nothing(
    store_noise, distribution
):
    lr = 0.1
    opt = ap.anti_pgd(
        lr, _SWITCH_OFF, 0, distribution=distribution, store_noise=store_noise
    )
    grads, emitted, state = _switch_off_run(opt)
    sgd = jax.tree.map(lambda g: -lr * g, grads)
    # Update 2 draws xi_2 = sigma(2) z_2 = 0: it emits sgd - xi_1.
    xi_1 = reference_noise(jax.random.key(0), 1, grads, jnp.float32(0.2), distribution)
    assert not any(bool(jnp.any(x == 0)) for x in jax.tree.leaves(xi_1))
    cancel = jax.tree.map(lambda u, xi: u - xi, sgd, xi_1)
    if store_noise:
        # The stored xi_1 is subtracted as it is: exact.
        _assert_bitwise_equal(emitted[2], cancel)
        assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(state[1].noise))
    else:
        # Regenerated inside the update, the draw fuses with the subtraction, and
        # XLA may contract them into one FMA: equal to within an ulp of xi_1.
        for actual, expected in zip(
            jax.tree.leaves(emitted[2]), jax.tree.leaves(cancel), strict=True
        ):
            np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-7)
    # Every later update adds exactly nothing.
    for updates in emitted[3:]:
        _assert_bitwise_equal(updates, sgd)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_switched_off_pgd_adds_nothing(distribution):
    lr = 0.1
    grads, emitted, _ = _switch_off_run(
        ap.pgd(lr, _SWITCH_OFF, 0, distribution=distribution)
    )
    sgd = jax.tree.map(lambda g: -lr * g, grads)
    for updates in emitted[2:]:
        _assert_bitwise_equal(updates, sgd)
