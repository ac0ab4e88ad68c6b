"""Checkpoint and resume: a stopped and resumed run continues bit for bit.

Every test trains a small regression for a few steps, saves params and
optimizer state mid-run, restores them into a fresh target and continues. The
resumed trajectory must equal the uninterrupted one exactly: the state holds
plain arrays only (count, raw key data, the previous noise), so nothing that
decides the noise can be lost or changed by a save and a restore.
"""

import functools
import os
import pickle
import subprocess
import sys
import textwrap

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_antipgd as ap

TOTAL_STEPS = 6
SAVE_AT = 3  # the number of steps taken when the checkpoint is saved

KEYS = {
    "int": lambda: 7,
    "raw": lambda: jax.random.PRNGKey(7),
    "typed_threefry": lambda: jax.random.key(7),
    "typed_rbg": lambda: jax.random.key(7, impl="rbg"),
}

OPTIMIZERS = {
    "anti_pgd_stored": lambda key: ap.anti_pgd(0.05, 0.1, key, momentum=0.9),
    "anti_pgd_regenerated": lambda key: ap.anti_pgd(
        0.05, 0.1, key, momentum=0.9, store_noise=False
    ),
    "pgd": lambda key: ap.pgd(0.05, 0.1, key, momentum=0.9),
}

# The rest of the noise family: a ring of K - 1 = 7 stored draws (written at
# slot n mod 7, so a resume mid-ring must pick up the right slot) and its
# regenerated twin, partial anticorrelation, and one leaf per step in turn.
FAMILY = {
    "fractional_pgd_stored": lambda key: ap.fractional_pgd(
        0.05, 0.1, key, hurst=0.25, momentum=0.9
    ),
    "fractional_pgd_regenerated": lambda key: ap.fractional_pgd(
        0.05, 0.1, key, hurst=0.25, momentum=0.9, store_noise=False
    ),
    "anti_pgd_partial": lambda key: ap.anti_pgd(
        0.05, 0.1, key, momentum=0.9, correlation=0.5
    ),
    "pgd_cyclic": lambda key: ap.pgd(0.05, 0.1, key, momentum=0.9, leaves="cyclic"),
    "anti_pgd_cyclic": lambda key: ap.anti_pgd(
        0.05, 0.1, key, momentum=0.9, leaves="cyclic"
    ),
}


def make_params():
    """Float32 and bfloat16 leaves, nested; the first axis of ``w`` splits 8 ways."""
    w = jax.random.normal(jax.random.key(0), (8, 4)) / 4
    return {
        "dense": {"w": w, "b": jnp.zeros(4)},
        "scale": jnp.ones([], jnp.bfloat16),
    }


def make_data():
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jax.random.normal(jax.random.key(2), (16, 4))
    return x, y


def loss(params, x, y):
    dense = params["dense"]
    prediction = (x @ dense["w"] + dense["b"][None]) * params["scale"].astype(
        jnp.float32
    )
    return jnp.mean((prediction - y) ** 2)


def make_step(opt, **jit_kwargs):
    def step(params, opt_state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, **jit_kwargs)


def run(step, params, opt_state, num_steps):
    x, y = make_data()
    for _ in range(num_steps):
        params, opt_state = step(params, opt_state, x, y)
    return params, opt_state


def abstract_target(opt):
    """The restore target, built without allocating or drawing anything."""
    return jax.eval_shape(
        lambda: {"params": make_params(), "opt_state": opt.init(make_params())}
    )


def orbax_save(directory, step, tree):
    with ocp.CheckpointManager(directory) as manager:
        manager.save(step, args=ocp.args.StandardSave(tree))
        manager.wait_until_finished()


def orbax_restore(directory, target):
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        assert step == SAVE_AT
        return manager.restore(step, args=ocp.args.StandardRestore(target))


def assert_resume_is_bit_identical(opt, directory):
    step = make_step(opt)
    params = make_params()
    opt_state = jax.jit(opt.init)(params)
    params, opt_state = run(step, params, opt_state, SAVE_AT)
    saved = {"params": params, "opt_state": opt_state}
    orbax_save(directory, SAVE_AT, saved)
    uninterrupted = run(step, params, opt_state, TOTAL_STEPS - SAVE_AT)

    restored = orbax_restore(directory, abstract_target(opt))
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    chex.assert_trees_all_equal(restored, saved)
    chex.assert_trees_all_equal_dtypes(restored, saved)
    resumed = run(
        step, restored["params"], restored["opt_state"], TOTAL_STEPS - SAVE_AT
    )
    chex.assert_trees_all_equal(resumed, uninterrupted)
    # The noise is live: the run moved away from plain SGD's trajectory.
    assert not np.array_equal(resumed[0]["dense"]["w"], sgd_params()["dense"]["w"])


@functools.cache
def sgd_params():
    sgd = optax.sgd(0.05, momentum=0.9)
    params, _ = run(make_step(sgd), make_params(), sgd.init(make_params()), TOTAL_STEPS)
    return params


# Every key kind with both store modes; PGD shares the key handling, so two
# kinds suffice there (each case compiles a step: the suite must stay quick).
RESUME_CASES = [
    *(
        (optimizer, key_kind)
        for optimizer in OPTIMIZERS
        if optimizer != "pgd"
        for key_kind in KEYS
    ),
    ("pgd", "raw"),
    ("pgd", "typed_rbg"),
    # The family shares the key handling too: one kind each, rbg where the
    # noise is regenerated (the state's impl code must survive the restore).
    ("fractional_pgd_stored", "raw"),
    ("fractional_pgd_regenerated", "typed_rbg"),
    ("anti_pgd_partial", "int"),
    ("pgd_cyclic", "typed_threefry"),
    ("anti_pgd_cyclic", "typed_rbg"),
]


@pytest.mark.parametrize(("optimizer", "key_kind"), RESUME_CASES)
def test_orbax_resume_is_bit_identical_to_uninterrupted_run(
    tmp_path, optimizer, key_kind
):
    opt = {**OPTIMIZERS, **FAMILY}[optimizer](KEYS[key_kind]())
    assert_resume_is_bit_identical(opt, tmp_path / "checkpoints")


@pytest.mark.parametrize("store_noise", [True, False])
def test_orbax_resume_inside_chain_with_clipping_and_schedule(tmp_path, store_noise):
    # The noise schedule reaches 0 after the restart: the resumed run must
    # cancel the last noise and then add nothing, exactly as the original does.
    noise_std = optax.linear_schedule(0.2, 0.0, transition_steps=SAVE_AT + 1)
    opt = optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.sgd(optax.cosine_decay_schedule(0.1, TOTAL_STEPS), momentum=0.9),
        ap.add_anticorrelated_noise(
            noise_std, jax.random.key(3), store_noise=store_noise
        ),
    )
    assert_resume_is_bit_identical(opt, tmp_path / "checkpoints")


def test_orbax_resume_under_inject_hyperparams(tmp_path):
    opt = optax.inject_hyperparams(ap.anti_pgd)(
        learning_rate=0.05, noise_std=0.1, key=7, store_noise=False
    )
    assert_resume_is_bit_identical(opt, tmp_path / "checkpoints")


def next_updates(update, opt_state):
    params = make_params()
    grads = jax.grad(loss)(params, *make_data())
    return update(grads, opt_state, params)


# The 7-slot ring of the fractional filter: a tuple of trees through msgpack.
@pytest.mark.parametrize("optimizer", [*OPTIMIZERS, "fractional_pgd_stored"])
def test_serialized_state_gives_the_same_next_updates(optimizer):
    opt = {**OPTIMIZERS, **FAMILY}[optimizer](jax.random.key(5, impl="rbg"))
    init = jax.jit(opt.init)
    _, opt_state = run(make_step(opt), make_params(), init(make_params()), 3)
    update = jax.jit(opt.update)
    expected = next_updates(update, opt_state)

    # flax.serialization (msgpack), into a fresh state (count 0): every value
    # must come from the bytes.
    data = flax.serialization.to_bytes(opt_state)
    restored = flax.serialization.from_bytes(init(make_params()), data)
    assert int(restored[-1].count) == 3
    chex.assert_trees_all_equal(restored, opt_state)
    chex.assert_trees_all_equal_dtypes(restored, opt_state)
    # from_bytes returns numpy arrays; feed jax arrays, as a training loop does
    # (optax's momentum on a numpy bfloat16 trace would promote by numpy rules).
    restored = jax.tree.map(jnp.asarray, restored)
    chex.assert_trees_all_equal(next_updates(update, restored), expected)

    # pickle
    restored = pickle.loads(pickle.dumps(opt_state))
    chex.assert_trees_all_equal(next_updates(update, restored), expected)


def run_python(script, *args, env=None):
    """Runs ``script`` in a fresh interpreter that can import this module."""
    process = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(__file__), **(env or {})},
        timeout=300,
    )
    assert process.returncode == 0, process.stdout + process.stderr
    return process.stdout


def fresh_process_optimizer(store_noise):
    key = jax.random.key(9, impl="rbg")
    return ap.anti_pgd(0.05, 0.1, key, momentum=0.9, store_noise=store_noise)


RESUME_IN_FRESH_PROCESS = """
    import sys

    import jax
    import numpy as np

    jax.config.update("jax_numpy_rank_promotion", "raise")
    import test_checkpoint as t

    directory = sys.argv[1]
    for store_noise in (True, False):
        opt = t.fresh_process_optimizer(store_noise)
        restored = t.orbax_restore(f"{directory}/{store_noise}", t.abstract_target(opt))
        params, _ = t.run(t.make_step(opt), restored["params"],
                          restored["opt_state"], t.TOTAL_STEPS - t.SAVE_AT)
        leaves = [np.asarray(leaf, np.float32) for leaf in jax.tree.leaves(params)]
        np.savez(f"{directory}/resumed_{store_noise}.npz", *leaves)
"""


def test_checkpoint_restores_in_a_fresh_process(tmp_path):
    expected = {}
    for store_noise in (True, False):
        opt = fresh_process_optimizer(store_noise)
        step = make_step(opt)
        opt_state = jax.jit(opt.init)(make_params())
        params, opt_state = run(step, make_params(), opt_state, SAVE_AT)
        tree = {"params": params, "opt_state": opt_state}
        orbax_save(tmp_path / str(store_noise), SAVE_AT, tree)
        expected[store_noise], _ = run(step, params, opt_state, TOTAL_STEPS - SAVE_AT)

    run_python(RESUME_IN_FRESH_PROCESS, tmp_path)
    for store_noise in (True, False):
        with np.load(tmp_path / f"resumed_{store_noise}.npz") as resumed:
            leaves = [resumed[f"arr_{i}"] for i in range(len(resumed.files))]
        want = jax.tree.leaves(expected[store_noise])
        chex.assert_trees_all_equal(leaves, [np.asarray(x, np.float32) for x in want])


RESUME_SHARDED = """
    import os
    import sys

    assert "jax" not in sys.modules
    assert "device_count=8" in os.environ["XLA_FLAGS"]
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_numpy_rank_promotion", "raise")
    import test_checkpoint as t

    assert jax.device_count() == 8, jax.devices()
    directory = sys.argv[1]
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def sharding(leaf):
        # Leaves shaped like w (the params and their noise) are split 8 ways.
        return split if leaf.shape == (8, 4) else replicated

    for store_noise in (True, False):
        opt = t.ap.anti_pgd(0.05, 0.1, 11, momentum=0.9, store_noise=store_noise)
        target = t.abstract_target(opt)
        shardings = jax.tree.map(sharding, target)
        target = jax.tree.map(
            lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
            target,
            shardings,
        )
        # One compiled program with pinned layouts for every run below.
        step = t.make_step(
            opt,
            in_shardings=(shardings["params"], shardings["opt_state"], replicated,
                          replicated),
            out_shardings=(shardings["params"], shardings["opt_state"]),
        )
        params = jax.device_put(t.make_params(), shardings["params"])
        opt_state = jax.device_put(opt.init(params), shardings["opt_state"])
        params, opt_state = t.run(step, params, opt_state, t.SAVE_AT)
        assert len(params["dense"]["w"].sharding.device_set) == 8
        path = os.path.join(directory, f"store_noise_{store_noise}")
        t.orbax_save(path, t.SAVE_AT, {"params": params, "opt_state": opt_state})
        uninterrupted = t.run(step, params, opt_state, t.TOTAL_STEPS - t.SAVE_AT)

        restored = t.orbax_restore(path, target)
        pairs = zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True)
        for leaf, s in pairs:
            assert leaf.sharding.is_equivalent_to(s, leaf.ndim), (leaf.sharding, s)
        if store_noise:
            noise = restored["opt_state"][-1].noise["dense"]["w"]  # its ring
            assert len(noise.sharding.device_set) == 8
        resumed = t.run(step, restored["params"], restored["opt_state"],
                        t.TOTAL_STEPS - t.SAVE_AT)
        leaves = jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)
        for a, b in zip(*leaves, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print("resumed bit-identically on", jax.device_count(), "devices")
"""


def test_orbax_resume_of_a_state_sharded_over_8_devices(tmp_path):
    out = run_python(
        RESUME_SHARDED,
        tmp_path,
        env={
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
            + " --xla_force_host_platform_device_count=8"
        },
    )
    assert "resumed bit-identically on 8 devices" in out
