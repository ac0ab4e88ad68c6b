"""The single-process scale-out checks of ``test_scale_out.py``, in one process.

JAX reads the host platform's device count once, when it starts, so these
checks run in a subprocess that fakes 8 CPU devices before importing jax.
Every check runs for every optimizer of :data:`OPTIMIZERS`; a failure is
recorded (with its traceback) and the others still run. The results go to
the JSON file named by the only argument::

    {"device_count": 8, "results": {check: {optimizer: "ok" | traceback}}}
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_antipgd as ap  # noqa: E402

NUM_DEVICES = 8
LEARNING_RATE = 0.05
# Large next to the gradient steps, so that any difference in the noise shows.
NOISE_STD = 0.1
KEY = 0
STEPS = 3
DRIFT_STEPS = 200
COLLECTIVE = re.compile(
    r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter"
)

OPTIMIZERS = {
    "pgd": lambda key=KEY: ap.pgd(LEARNING_RATE, NOISE_STD, key),
    "anti_pgd": lambda key=KEY: ap.anti_pgd(LEARNING_RATE, NOISE_STD, key),
    "anti_pgd_regenerated": lambda key=KEY: ap.anti_pgd(
        LEARNING_RATE, NOISE_STD, key, store_noise=False
    ),
    "anti_pgd_rademacher": lambda key=KEY: ap.anti_pgd(
        LEARNING_RATE, NOISE_STD, key, distribution="rademacher"
    ),
    # A ring of stored draws, each a params-like tree to shard like them. Four
    # taps: the 3 steps of a run write every slot of the ring once, and the
    # eager inits compile 3 draws instead of the default 8 taps' 7.
    "fractional_pgd": lambda key=KEY: ap.fractional_pgd(
        LEARNING_RATE, NOISE_STD, key, hurst=0.25, num_taps=4
    ),
    # One leaf draws per step (a lax.switch over the leaves).
    "pgd_cyclic": lambda key=KEY: ap.pgd(
        LEARNING_RATE, NOISE_STD, key, leaves="cyclic"
    ),
}

# (shape, dtype, partition spec over the mesh axis "data"): rows sharded, a
# bias with two elements per device, columns sharded. Few leaves: compiling
# the step is most of the time these checks take.
PARAM_LAYOUT = {
    "dense": {
        "kernel": ((32, 16), jnp.float32, P("data", None)),
        "bias": ((16,), jnp.float32, P("data")),
    },
    "embed": ((4, 64), jnp.bfloat16, P(None, "data")),
}


def _is_layout(node):
    return isinstance(node, tuple) and len(node) == 3


def make_params():
    """Deterministic params, distinct values in every element."""
    leaves, treedef = jax.tree.flatten(PARAM_LAYOUT, is_leaf=_is_layout)
    arrays = []
    for index, (shape, dtype, _) in enumerate(leaves):
        values = np.sin(np.arange(np.prod(shape, dtype=int)) + 10.0 * index)
        arrays.append(jnp.asarray(values.reshape(shape), dtype))
    return jax.tree.unflatten(treedef, arrays)


def param_specs():
    return jax.tree.map(lambda layout: layout[2], PARAM_LAYOUT, is_leaf=_is_layout)


def make_mesh(num_devices):
    return jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])


def grads_of(params):
    """A gradient that depends on the params, so the steps feed back."""
    return jax.tree.map(lambda p: jnp.cos(p) + p, params)


def _is_noise_state(node):
    return isinstance(node, ap.CorrelatedNoiseState)


def noise_states(state):
    leaves = jax.tree.leaves(state, is_leaf=_is_noise_state)
    return [s for s in leaves if _is_noise_state(s)]


def has_stored_noise(state):
    return any(jax.tree.leaves(s.noise) for s in noise_states(state))


def ring_sharding(sharding):
    """The sharding of a ring of past draws, ``[slots, *param.shape]``: each
    slot sharded like the param."""
    return NamedSharding(sharding.mesh, P(None, *sharding.spec))


def state_shardings(state_shapes, shardings, replicated):
    """Shardings for an optimizer state: the ring of past draws like the params."""

    def of_node(node):
        if _is_noise_state(node):
            small = jax.tree.map(lambda _: replicated, node._replace(noise=()))
            if isinstance(node.noise, tuple) and not node.noise:
                return small
            ring = jax.tree.map(lambda _, sh: ring_sharding(sh), node.noise, shardings)
            return small._replace(noise=ring)
        return jax.tree.map(lambda _: replicated, node)

    return jax.tree.map(of_node, state_shapes, is_leaf=_is_noise_state)


def as_numpy(tree):
    # numpy's testing does not know bfloat16; every other dtype stays as it is.
    return jax.tree.map(
        lambda x: np.asarray(x, np.float32 if x.dtype == jnp.bfloat16 else None),
        jax.device_get(tree),
    )


def assert_trees_equal(actual, expected, message=""):
    jax.tree.map(
        lambda a, e: np.testing.assert_array_equal(a, e, err_msg=message),
        as_numpy(actual),
        as_numpy(expected),
    )


def assert_trees_close(actual, expected, message=""):
    # Elementwise maths compiled for a shard and for the whole array may round
    # differently (vectorised vs scalar transcendentals): a few float32 ulps,
    # or one bfloat16 ulp (2**-8 relative) for the bfloat16 leaf.
    def close(a, e, dtype):
        rtol = 2**-7 if dtype == jnp.bfloat16 else 1e-6
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol, err_msg=message)

    jax.tree.map(
        close,
        as_numpy(actual),
        as_numpy(expected),
        jax.tree.map(lambda x: x.dtype, actual),
    )


def make_step(opt):
    def step(params, state):
        updates, state = opt.update(grads_of(params), state, params)
        return optax.apply_updates(params, updates), state, updates

    return step


def single_device_run(name):
    """The reference: the run on a mesh of one device, as host arrays."""
    return jax.device_get(sharded_run(name, 1)["history"])


@functools.cache
def sharded_run(name, num_devices):
    """``init`` under jit with out_shardings, then jitted steps, on a mesh."""
    opt = OPTIMIZERS[name]()
    mesh = make_mesh(num_devices)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs())
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(make_params(), shardings)
    shapes = jax.eval_shape(opt.init, params)
    state_sh = state_shardings(shapes, shardings, replicated)
    state = jax.jit(opt.init, out_shardings=state_sh)(params)
    init_state = state
    step = jax.jit(make_step(opt))
    hlo = step.lower(params, state).compile().as_text()
    history = []
    for _ in range(STEPS):
        params, state, updates = step(params, state)
        history.append((params, state, updates))
    return {
        "shardings": shardings,
        "state_shardings": state_sh,
        "init_state": init_state,
        "history": history,
        "hlo": hlo,
    }


# ---------------------------------------------------------------- the checks


def check_pmap_replicated_state_updates_equal_single_device(name):
    opt = OPTIMIZERS[name]()
    params = make_params()
    state = opt.init(params)
    replicate = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jnp.broadcast_to(x, (NUM_DEVICES, *jnp.shape(x))), tree
    )
    # init inside pmap and init once then replicate give the same state (to
    # rounding: the eager and the compiled draw may differ in the last bit).
    assert_trees_close(
        jax.pmap(opt.init)(replicate(params)), replicate(state), "pmap(init)"
    )
    pstep = jax.pmap(make_step(opt))
    replicated_params, replicated_state = replicate(params), replicate(state)
    for n, (ref_params, _, ref_updates) in enumerate(single_device_run(name)):
        replicated_params, replicated_state, updates = pstep(
            replicated_params, replicated_state
        )
        host_params, host_updates = jax.device_get((replicated_params, updates))
        for replica in range(NUM_DEVICES):
            at = lambda tree, r=replica: jax.tree.map(lambda x: x[r], tree)  # noqa: E731
            what = f"step {n} replica {replica}"
            assert_trees_equal(at(host_updates), at(host_updates, 0), what)
            assert_trees_close(at(host_updates), ref_updates, what)
            assert_trees_close(at(host_params), ref_params, what)


def _regression_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_DEVICES * 4, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 1)) + 0.1 * rng.normal(size=(len(x), 1))).astype(
        np.float32
    )
    return x, y


def _regression_loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _train_scan(opt, params, state, x, y, grad_fn, steps):
    def body(carry, _):
        params, state = carry
        updates, state = opt.update(grad_fn(params, x, y), state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), params

    _, history = jax.lax.scan(body, (params, state), length=steps)
    return history


def check_pmap_data_parallel_replicas_never_drift(name):
    opt = OPTIMIZERS[name]()
    x, y = _regression_data()
    params = {"w": jnp.zeros((8, 1)), "b": jnp.zeros(())}
    state = opt.init(params)

    def pmean_grad(params, x, y):
        return jax.lax.pmean(jax.grad(_regression_loss)(params, x, y), "batch")

    @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, None, 0, 0))
    def train(params, state, x, y):
        return _train_scan(opt, params, state, x, y, pmean_grad, DRIFT_STEPS)

    shard = lambda a: a.reshape(NUM_DEVICES, -1, a.shape[-1])  # noqa: E731
    history = jax.device_get(train(params, state, shard(x), shard(y)))
    # Bit-identical on every replica at every one of the 200 steps.
    for replica in range(1, NUM_DEVICES):
        jax.tree.map(
            lambda h, r=replica: np.testing.assert_array_equal(
                h[r], h[0], err_msg=f"replica {r} drifted"
            ),
            history,
        )
    # The same run on one device with the whole batch.
    reference = jax.jit(
        lambda: _train_scan(
            opt, params, state, x, y, jax.grad(_regression_loss), DRIFT_STEPS
        )
    )()
    # The mean of 8 per-device means rounds differently from one mean over the
    # batch; gradient descent on this convex loss keeps that below 1e-5.
    jax.tree.map(
        lambda h, r: np.testing.assert_allclose(h[0], r, rtol=1e-5, atol=1e-5),
        history,
        jax.device_get(reference),
    )
    # The noise is really there: plain sgd ends elsewhere.
    plain = optax.sgd(LEARNING_RATE)
    sgd_history = jax.jit(
        lambda: _train_scan(
            plain,
            params,
            plain.init(params),
            x,
            y,
            jax.grad(_regression_loss),
            DRIFT_STEPS,
        )
    )()
    assert np.abs(history["w"][0, -1] - np.asarray(sgd_history["w"][-1])).max() > 1e-2


def check_sharded_jit_updates_equal_single_device(name):
    run = sharded_run(name, NUM_DEVICES)
    reference = single_device_run(name)
    for n, (
        (params, state, updates),
        (ref_params, ref_state, ref_updates),
    ) in enumerate(zip(run["history"], reference, strict=True)):
        assert_trees_close(updates, ref_updates, f"updates of step {n}")
        assert_trees_close(params, ref_params, f"params after step {n}")
        assert_trees_close(state, ref_state, f"state after step {n}")


def _assert_sharded_like(tree, shardings, what):
    def check(leaf, sharding):
        assert isinstance(leaf, jax.Array), (what, type(leaf))
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (
            f"{what}: {leaf.sharding} is not {sharding}"
        )
        if not sharding.is_fully_replicated:
            assert not leaf.sharding.is_fully_replicated, f"{what} is replicated"

    jax.tree.map(check, tree, shardings)


def check_sharded_jit_output_shardings_equal_params_shardings(name):
    run = sharded_run(name, NUM_DEVICES)
    for n, (params, _, updates) in enumerate(run["history"]):
        _assert_sharded_like(params, run["shardings"], f"params after step {n}")
        _assert_sharded_like(updates, run["shardings"], f"updates of step {n}")


def _assert_state_noise_sharded_like_params(state, shardings, what):
    if has_stored_noise(state):
        for noise_state in noise_states(state):
            rings = jax.tree.map(ring_sharding, shardings)
            _assert_sharded_like(noise_state.noise, rings, f"{what}, stored noise")
    else:
        # No stored noise (pgd, store_noise=False): nothing params-sized at all.
        for leaf in jax.tree.leaves(state):
            assert leaf.size <= 4, (what, leaf.shape)


def check_sharded_jit_stored_noise_sharded_like_params(name):
    run = sharded_run(name, NUM_DEVICES)
    for n, (_, state, _) in enumerate(run["history"]):
        _assert_state_noise_sharded_like_params(
            state, run["shardings"], f"state after step {n}"
        )


def check_sharded_jit_compiled_update_has_no_collective(name):
    found = sorted(set(COLLECTIVE.findall(sharded_run(name, NUM_DEVICES)["hlo"])))
    assert not found, f"collectives in the compiled update: {found}"
    # Each leaf alone too, in the plainest use: eager init (an uncommitted
    # state), then a jitted update. XLA may partition a lone leaf differently.
    opt = OPTIMIZERS[name]()
    mesh = make_mesh(NUM_DEVICES)
    update = jax.jit(lambda g, s: opt.update(g, s)[0])
    for path, (shape, dtype, spec) in jax.tree_util.tree_leaves_with_path(
        PARAM_LAYOUT, is_leaf=_is_layout
    ):
        leaf = jax.device_put(jnp.ones(shape, dtype), NamedSharding(mesh, spec))
        hlo = update.lower(leaf, opt.init(leaf)).compile().as_text()
        found = sorted(set(COLLECTIVE.findall(hlo)))
        assert not found, f"{jax.tree_util.keystr(path)} alone, eager init: {found}"


def check_sharded_jit_with_out_shardings_keeps_noise_sharded_without_collective(
    name,
):
    # What the Scale-out page tells users to do: pin the step's output shardings.
    run = sharded_run(name, NUM_DEVICES)
    step = jax.jit(
        make_step(OPTIMIZERS[name]()),
        out_shardings=(run["shardings"], run["state_shardings"], run["shardings"]),
    )
    params, state = run["history"][0][:2]
    found = sorted(
        set(COLLECTIVE.findall(step.lower(params, state).compile().as_text()))
    )
    assert not found, f"collectives in the compiled update: {found}"
    params, state, updates = step(params, state)
    _assert_state_noise_sharded_like_params(state, run["shardings"], "state")
    assert_trees_close(
        (params, state, updates), run["history"][1], "pinned vs unpinned step"
    )


def check_sharded_jit_results_do_not_depend_on_device_count(name):
    results = {n: sharded_run(name, n)["history"] for n in (1, 2, NUM_DEVICES)}
    for num_devices in (2, NUM_DEVICES):
        for n, (actual, expected) in enumerate(
            zip(results[num_devices], results[1], strict=True)
        ):
            assert_trees_equal(actual, expected, f"{num_devices} devices, step {n}")


def check_init_on_shape_dtype_structs_via_eval_shape(name):
    opt = OPTIMIZERS[name]()
    mesh = make_mesh(NUM_DEVICES)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs())
    structs = jax.tree.map(
        lambda p, sharding: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sharding),
        make_params(),
        shardings,
    )
    shapes = jax.eval_shape(opt.init, structs)
    expected = jax.eval_shape(opt.init, make_params())
    assert jax.tree.structure(shapes) == jax.tree.structure(expected)
    jax.tree.map(
        lambda s, e: (s.shape, s.dtype) == (e.shape, e.dtype) or 1 / 0, shapes, expected
    )
    state = opt.init(make_params())
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    for noise_state in noise_states(shapes) if has_stored_noise(shapes) else []:
        jax.tree.map(  # a ring [slots, *shape] per float leaf
            lambda ring, p: (ring.shape[1:], ring.dtype) == (p.shape, p.dtype) or 1 / 0,
            noise_state.noise,
            structs,
        )


def check_init_under_jit_with_out_shardings(name):
    run = sharded_run(name, NUM_DEVICES)
    state = run["init_state"]
    _assert_state_noise_sharded_like_params(state, run["shardings"], "init state")
    # The same numbers as an unsharded init (to rounding: eager vs compiled).
    assert_trees_close(state, OPTIMIZERS[name]().init(make_params()), "init")


def check_state_shardings_from_optax_tree_map_params(name):
    opt = OPTIMIZERS[name]()
    mesh = make_mesh(NUM_DEVICES)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs())
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(make_params(), shardings)
    shapes = jax.eval_shape(opt.init, params)

    def like_param(leaf, sharding, param):  # the recipe of docs/scale_out.md
        # The ring of past draws is [slots, *param.shape]: each slot like the param.
        leading = (None,) * (leaf.ndim - param.ndim)
        return NamedSharding(sharding.mesh, P(*leading, *sharding.spec))

    state_sh = optax.tree_utils.tree_map_params(
        opt,
        like_param,
        shapes,
        shardings,
        params,
        transform_non_params=lambda _: replicated,
    )
    state = jax.jit(opt.init, out_shardings=state_sh)(params)
    _assert_state_noise_sharded_like_params(state, shardings, "init state")


def check_init_on_sharded_params_shards_noise_like_params(name):
    opt = OPTIMIZERS[name]()
    mesh = make_mesh(NUM_DEVICES)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs())
    params = jax.device_put(make_params(), shardings)
    _assert_state_noise_sharded_like_params(opt.init(params), shardings, "init")
    # With explicit mesh axes, a jitted function that creates arrays from its
    # arguments' shardings (even jnp.zeros_like) must run under jax.set_mesh.
    with jax.set_mesh(mesh):
        state = jax.jit(opt.init)(params)
    _assert_state_noise_sharded_like_params(state, shardings, "jit(init)")


# How jax's transfer log names an array it moves between devices.
_DEVICE_TO_DEVICE = re.compile(
    r"device-to-device transfer: aval=ShapedArray\((\w+)\[([\d,]*)\]"
)


def _parse_transfers(text):
    return [
        (dtype, tuple(int(size) for size in shape.split(",") if size))
        for dtype, shape in _DEVICE_TO_DEVICE.findall(text)
    ]


def _device_to_device_transfers(fn, *args):
    """``fn(*args)``, and (dtype, shape) of every array it moved between devices.

    Under ``transfer_guard_device_to_device("log_explicit")`` jax logs every
    such copy, explicit (``jax.device_put``) or implicit (jit copying an
    argument to the devices of its computation), from C++ to the process's
    stderr, which is read back here through a temporary file.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            with jax.transfer_guard_device_to_device("log_explicit"):
                result = jax.block_until_ready(fn(*args))
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return result, _parse_transfers(log.read().decode(errors="replace"))


@functools.cache
def _assert_transfer_log_sees_a_leaf_moved(axis_type, size):
    """Asserts that the transfer log sees a leaf-sized array moved to the mesh.

    By either route: ``jax.device_put`` from one device, or an uncommitted
    argument of a jit on the mesh. Once per axis type.
    """
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))
    sharding = NamedSharding(mesh, P("data"))
    for route in (
        lambda x: jax.device_put(x, sharding),
        jax.jit(lambda x: x, out_shardings=sharding),
    ):
        _, moved = _device_to_device_transfers(route, jnp.zeros(size))
        assert ("float32", (size,)) in moved, (axis_type, moved)


def check_eager_init_on_sharded_params_never_moves_a_whole_leaf(name):
    # Eager init (and the first eager update) on params sharded 8 ways must
    # draw each block on its own device: a leaf drawn whole on one device and
    # then placed (jax.device_put) costs the whole leaf's memory there, and
    # shows as a device-to-device transfer of the leaf. Only small arrays may
    # move (the key, the count, sigma, the filter's coefficients: uncommitted
    # arrays that jit copies to the mesh). Auto mesh axes too, where no
    # sharding is in the types. (A leaf drawn whole on every device would
    # move nothing: this check does not see that.)
    opt = OPTIMIZERS[name]()
    for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
        mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))
        shardings = jax.tree.map(
            lambda spec, mesh=mesh: NamedSharding(mesh, spec), param_specs()
        )
        params = jax.device_put(make_params(), shardings)
        smallest_leaf = min(leaf.size for leaf in jax.tree.leaves(params))
        what = f"{axis_type} mesh"

        _assert_transfer_log_sees_a_leaf_moved(axis_type, smallest_leaf)
        state, moved = _device_to_device_transfers(opt.init, params)
        whole_leaves = sorted({m for m in moved if np.prod(m[1]) >= smallest_leaf})
        assert not whole_leaves, f"{what}: init moved {whole_leaves}"
        _assert_state_noise_sharded_like_params(state, shardings, f"{what}: init")

        (updates, state), moved = _device_to_device_transfers(
            opt.update, grads_of(params), state, params
        )
        whole_leaves = sorted({m for m in moved if np.prod(m[1]) >= smallest_leaf})
        assert not whole_leaves, f"{what}: update moved {whole_leaves}"
        _assert_sharded_like(updates, shardings, f"{what}: updates")
        _assert_state_noise_sharded_like_params(state, shardings, f"{what}: update")


def _shard_map_train(make_opt, mesh, fold_axis_index):
    @jax.jit
    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=P("data"), out_specs=P("data")
    )
    def train(params):
        key = jax.random.key(KEY)
        if fold_axis_index:
            key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        opt = make_opt(key)
        state = opt.init(params)
        for _ in range(STEPS):
            updates, state = opt.update(grads_of(params), state, params)
            params = optax.apply_updates(params, updates)
        return params

    return train


def check_shard_map_runs_on_per_device_shards(name):
    make_opt = OPTIMIZERS[name]
    mesh = make_mesh(NUM_DEVICES)
    sharding = NamedSharding(mesh, P("data"))
    kernel = make_params()["dense"]["kernel"]
    params = jax.device_put({"kernel": kernel}, sharding)
    train = _shard_map_train(make_opt, mesh, fold_axis_index=False)
    found = sorted(set(COLLECTIVE.findall(train.lower(params).compile().as_text())))
    assert not found, f"collectives in the shard_map'd update: {found}"
    result = train(params)
    _assert_sharded_like(result, {"kernel": sharding}, "shard_map output")
    result = jax.device_get(result)
    # Each device runs the transform on its block as if that were all there is.
    blocks = np.split(np.asarray(kernel), NUM_DEVICES)
    one_device = make_mesh(1)
    local = _shard_map_train(make_opt, one_device, fold_axis_index=False)
    for index, block in enumerate(blocks):
        block = jax.device_put(block, NamedSharding(one_device, P("data")))
        expected = local({"kernel": block})["kernel"]
        rows = slice(index * len(block), (index + 1) * len(block))
        np.testing.assert_allclose(
            result["kernel"][rows], expected, rtol=1e-6, atol=1e-6
        )
    # Same key, step and leaf path: every block draws the same noise, so equal
    # blocks stay equal.
    ones = jax.device_put({"kernel": jnp.ones_like(kernel)}, sharding)
    same = np.split(np.asarray(train(ones)["kernel"]), NUM_DEVICES)
    for block in same[1:]:
        np.testing.assert_array_equal(block, same[0])


def check_shard_map_with_axis_index_in_key_draws_distinct_noise(name):
    # What the docs tell users who want independent noise in every block.
    mesh = make_mesh(NUM_DEVICES)
    kernel = make_params()["dense"]["kernel"]
    ones = jax.device_put(
        {"kernel": jnp.ones_like(kernel)}, NamedSharding(mesh, P("data"))
    )
    folded = _shard_map_train(OPTIMIZERS[name], mesh, fold_axis_index=True)
    different = np.split(np.asarray(folded(ones)["kernel"]), NUM_DEVICES)
    for block in different[1:]:
        assert np.abs(block - different[0]).max() > 1e-3


CHECKS = {
    name[len("check_") :]: function
    for name, function in list(globals().items())
    if name.startswith("check_")
}


def main(out_path):
    results, seconds = {}, {}
    for check_name, check in CHECKS.items():
        results[check_name] = {}
        start = time.perf_counter()
        for name in OPTIMIZERS:
            try:
                check(name)
                results[check_name][name] = "ok"
            except Exception:  # noqa: BLE001 -- recorded, reported by the test
                results[check_name][name] = traceback.format_exc()
        seconds[check_name] = round(time.perf_counter() - start, 2)
    with open(out_path, "w") as file:
        json.dump(
            {
                "device_count": jax.device_count(),
                "results": results,
                "seconds": seconds,
            },
            file,
        )


if __name__ == "__main__":
    main(sys.argv[1])
