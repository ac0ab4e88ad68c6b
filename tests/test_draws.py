"""The fast paths draw exactly the noise of the per-leaf definition.

The noise law of a leaf: ``z_n = draw(fold_in(fold_in(fold_in(key, n), high),
low))`` with ``(high, low)`` the blake2b digest of the leaf's ``keystr`` path.
The library batches the hashes of the leaves' keys, draws same-shaped leaves
in one loop with the threefry hash written out (``_threefry``), and skips the
draw when the scale is 0; these tests pin that none of it changes one bit.
"""

import hashlib
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


def _reference_leaf_noise(key, step, path, leaf, scale, distribution):
    """The noise law written out leaf by leaf, without any batching."""
    digest = hashlib.blake2b(jax.tree_util.keystr(path).encode(), digest_size=8)
    high, low = np.frombuffer(digest.digest(), dtype="<u4")
    leaf_key = jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(key, step), high), low
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


def _reference_tree_noise(key, step, tree, scale, distribution, cyclic=False):
    """With ``cyclic``, float leaf ``step mod L`` draws and the others are zeros."""
    is_float = lambda leaf: jnp.issubdtype(jnp.result_type(leaf), jnp.floating)  # noqa: E731
    num_floats = sum(is_float(leaf) for leaf in jax.tree.leaves(tree))
    position = iter(range(num_floats))

    def leaf_noise(path, leaf):
        if not is_float(leaf):
            return None
        if cyclic and next(position) != step % num_floats:
            return jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf))
        return _reference_leaf_noise(key, step, path, leaf, scale, distribution)

    return jax.tree.map_with_path(leaf_noise, tree)


def _tree():
    """Groups of same-shaped leaves, lone leaves, odd row lengths, low precision."""
    return {
        "scalar": jnp.zeros(()),
        "vector": jnp.zeros((33,)),
        "prime": jnp.zeros((197,)),  # no divisor between chunk / 2 and chunk
        "empty": jnp.zeros((0, 5)),
        "layers": [jnp.zeros((7, 65)) for _ in range(5)],
        "pair": (jnp.zeros((3, 2, 31)), jnp.zeros((3, 2, 31))),
        "scalars": [jnp.zeros(()), jnp.zeros(())],
        "bf16": [jnp.zeros((4, 40), jnp.bfloat16) for _ in range(3)],
        "f16": [jnp.zeros((4, 40), jnp.float16), jnp.zeros((4, 40), jnp.float16)],
        "mixed": [jnp.zeros((4, 40), jnp.float32)],
        "int": jnp.zeros((4,), jnp.int32),
        "none": None,
    }


def _assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(
            np.atleast_1d(np.asarray(a)).view(np.uint8),
            np.atleast_1d(np.asarray(e)).view(np.uint8),
        )


_KEYS = {
    "threefry": lambda: jax.random.key(3),
    "rbg": lambda: jax.random.key(3, impl="rbg"),
    "unsafe_rbg": lambda: jax.random.key(3, impl="unsafe_rbg"),
}


# Only threefry keys draw in loops: other impls take the per-leaf path whatever
# the device count and chunk size, so they are checked there alone.
PATHS = [
    (path, impl)
    for path in ("loops", "small chunks", "per leaf")
    for impl in _KEYS
    if impl == "threefry" or path == "per leaf"
]


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize(("path", "impl"), PATHS)
def test_tree_noise_is_bit_identical_to_the_per_leaf_definition(
    distribution, impl, path, monkeypatch
):
    # Loops: as on one CPU device (threefry keys draw in loops, others never);
    # small chunks: leaves split over several iterations (whole chunks or the
    # last one padded), and those past the size cap drawn by jax; per leaf: as
    # on several devices. The suite may run with 8 CPU devices.
    monkeypatch.setattr(jax, "device_count", lambda: 8 if path == "per leaf" else 1)
    if path == "small chunks":
        monkeypatch.setattr(_draws, "CHUNK", 64)
        monkeypatch.setattr(_threefry, "MAX_SIZE", 300)
    key, tree = _KEYS[impl](), _tree()
    noise = jax.jit(
        lambda key, step, scale: _draws.tree_noise(key, step, tree, scale, distribution)
    )
    # Both jitted: XLA may contract a multiply and an add into one FMA inside a
    # fused kernel, so an eager op-by-op draw can differ in the last bit.
    reference = jax.jit(
        lambda key, step, scale: _reference_tree_noise(
            key, step, tree, scale, distribution
        )
    )
    for step in (0, 5, 2**31 - 1):
        args = key, jnp.int32(step), jnp.float32(0.3)
        _assert_bitwise_equal(noise(*args), reference(*args))


@pytest.mark.parametrize(
    ("path", "impl", "distribution"),
    [
        ("loops", "threefry", "gaussian"),
        ("per leaf", "threefry", "gaussian"),
        ("per leaf", "rbg", "rademacher"),
    ],
)
def test_cyclic_noise_is_the_definition_on_one_leaf_per_step(
    impl, distribution, path, monkeypatch
):
    # Only float leaf m mod L draws, its stream unchanged; the others are zero.
    monkeypatch.setattr(jax, "device_count", lambda: 8 if path == "per leaf" else 1)
    key, tree = _KEYS[impl](), _tree()
    noise = jax.jit(
        lambda step, scale: _draws.tree_noise(
            key, step, tree, scale, distribution, cyclic=True
        )
    )
    reference = jax.jit(
        lambda step, scale: _reference_tree_noise(
            key, step, tree, scale, distribution, cyclic=True
        ),
        static_argnums=0,
    )
    num_floats = 19  # the float leaves of _tree()
    for step in (0, 3, 7, 18, 19 + 9, 2**31 - 1):
        args = jnp.float32(0.3)
        _assert_bitwise_equal(noise(jnp.int32(step), args), reference(step, args))
        drawn = [bool(jnp.any(x != 0)) for x in jax.tree.leaves(noise(step, args))]
        assert len(drawn) == num_floats
        # The empty leaf cannot show its draw; every other active leaf does.
        assert sum(drawn) == (0 if step % num_floats == 3 else 1), step


def test_only_threefry_keys_on_one_cpu_device_draw_in_loops(monkeypatch):
    threefry, rbg = jax.random.key(0), jax.random.key(0, impl="rbg")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert _draws.draws_in_loops(threefry)
    assert not _draws.draws_in_loops(rbg)
    with jax.threefry_partitionable(False):  # jax's bits then follow another law
        assert not _draws.draws_in_loops(threefry)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not _draws.draws_in_loops(threefry)
    monkeypatch.undo()
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    assert not _draws.draws_in_loops(threefry)


def test_same_shaped_leaves_are_drawn_in_one_loop_on_one_device(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    tree = [jnp.zeros((8, 8)) for _ in range(6)]
    hlo = (
        jax.jit(
            lambda key: _draws.tree_noise(
                key, jnp.int32(1), tree, jnp.float32(1.0), "gaussian"
            )
        )
        .lower(jax.random.key(0))
        .as_text()
    )
    # The loop's stacked output: 6 leaves of one 64-element chunk each.
    assert "tensor<6x64xf32>" in hlo


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


def test_float64_loops_are_bit_identical_to_the_per_leaf_definition():
    # x64 is a process-wide switch: check it in a fresh interpreter.
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from optax_antipgd import _draws, _threefry
        from tests.test_draws import _reference_tree_noise
        jax.device_count = lambda: 1  # loops, even where XLA_FLAGS fakes devices
        tree = [jnp.zeros((3, 33), jnp.float64) for _ in range(3)] + [jnp.zeros(())]
        key = jax.random.key(1)
        bits = jax.random.bits(key, (9, 70), jnp.uint64)
        assert np.array_equal(
            _draws.normal_from_bits(bits, jnp.float64),
            jax.random.normal(key, (9, 70), jnp.float64),
        )
        counters = jax.lax.iota(jnp.uint32, 630).reshape(9, 70)
        assert np.array_equal(
            _threefry.bits(jax.random.key_data(key), counters, jnp.uint64), bits
        )
        for distribution in ("gaussian", "rademacher"):
            noise = jax.jit(lambda k: _draws.tree_noise(
                k, jnp.int32(2), tree, jnp.float64(0.3), distribution))(key)
            expected = jax.jit(lambda k: _reference_tree_noise(
                k, 2, tree, jnp.float64(0.3), distribution))(key)
            for a, e in zip(jax.tree.leaves(noise), jax.tree.leaves(expected)):
                assert a.dtype == e.dtype == jnp.float64
                assert np.array_equal(a, e)
        print("ok")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_ENABLE_X64": "1", "PYTHONPATH": root}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


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
    # Update 1 draws xi_2 = sigma(2) z_2 = 0: it emits sgd - xi_1.
    xi_1 = jax.jit(
        lambda key: _reference_tree_noise(key, 1, grads, jnp.float32(0.2), distribution)
    )(jax.random.key(0))
    assert not any(bool(jnp.any(x == 0)) for x in jax.tree.leaves(xi_1))
    cancel = jax.tree.map(lambda u, xi: u - xi, sgd, xi_1)
    if store_noise:
        # The stored xi_1 is subtracted as it is: exact.
        _assert_bitwise_equal(emitted[1], cancel)
        assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(state[1].noise[0]))
    else:
        # Regenerated inside the update, the draw fuses with the subtraction, and
        # XLA may contract them into one FMA: equal to within an ulp of xi_1.
        for actual, expected in zip(
            jax.tree.leaves(emitted[1]), jax.tree.leaves(cancel), strict=True
        ):
            np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-7)
    # Every later update adds exactly nothing.
    for updates in emitted[2:]:
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
