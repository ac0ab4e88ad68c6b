"""One process of the multi-process test in ``test_scale_out.py``.

Trains a small model data-parallel for a few ``anti_pgd`` steps on a global
mesh over every device of every process, then writes the final params (as this
process sees them) to ``--out``. With ``--num-processes 1`` it is the
single-process reference run.

Usage::

    python tests/_distributed_worker.py --num-processes 2 --process-id 0 \
        --port 12345 --local-devices 2 --steps 20 --out /tmp/p0.npz
"""

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--local-devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    # The host platform's device count is read when jax initialises its backend.
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} "
        f"--xla_force_host_platform_device_count={args.local_devices}"
    )
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )

    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import optax_antipgd as ap

    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.local_device_count() == args.local_devices, jax.local_devices()
    num_devices = args.num_processes * args.local_devices
    assert jax.device_count() == num_devices, jax.devices()

    mesh = jax.make_mesh((num_devices,), ("data",))
    replicated = NamedSharding(mesh, P())
    by_example = NamedSharding(mesh, P("data"))

    # Every process builds the same global batch; each device holds its rows.
    rng = np.random.default_rng(0)
    global_x = rng.normal(size=(8 * num_devices, 4)).astype(np.float32)
    global_y = np.sin(global_x.sum(axis=1, keepdims=True)).astype(np.float32)

    def global_array(host_array):
        return jax.make_array_from_callback(
            host_array.shape, by_example, lambda index: host_array[index]
        )

    x, y = global_array(global_x), global_array(global_y)
    init_rng = np.random.default_rng(1)
    params = {
        "hidden": {
            "kernel": init_rng.normal(size=(4, 16)).astype(np.float32) * 0.5,
            "bias": np.zeros(16, np.float32),
        },
        "out": {
            "kernel": init_rng.normal(size=(16, 1)).astype(np.float32) * 0.25,
            "bias": np.zeros(1, np.float32),
        },
    }
    initial_params = jax.device_put(params, replicated)

    def loss(params, x, y):
        hidden = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
        prediction = hidden @ params["out"]["kernel"] + params["out"]["bias"]
        return jnp.mean((prediction - y) ** 2)

    def host_copy(array):
        # Replicated: this process's first local shard is a full copy.
        assert array.sharding.is_equivalent_to(replicated, array.ndim), array.sharding
        return np.asarray(array.addressable_data(0))

    evaluate = jax.jit(loss, out_shardings=replicated)
    local = {"initial_loss": host_copy(evaluate(initial_params, x, y))}
    # "trained" sums gradients across devices at every step; "noise_only"
    # (learning rate 0) adds the noise to the initial params with no reduction
    # in between. The stored noise of both runs is a function of the key, the
    # step count and the leaf's path only. Entries are named
    # "<optimizer>/<run>/params[...]", ".../noise[...]" and ".../loss".
    # Anti-PGD runs both; the rest of the family adds the noise only.
    runs = [
        ("anti_pgd/trained", ap.anti_pgd(0.05, 0.01, 0)),
        ("anti_pgd/noise_only", ap.anti_pgd(0.0, 0.01, 0)),
        ("fractional_pgd/noise_only", ap.fractional_pgd(0.0, 0.01, 0, hurst=0.25)),
        ("pgd_cyclic/noise_only", ap.pgd(0.0, 0.01, 0, leaves="cyclic")),
    ]
    for run, opt in runs:
        params = initial_params
        state = jax.jit(opt.init, out_shardings=replicated)(params)

        @jax.jit
        def step(params, state, x, y, opt=opt):
            grads = jax.grad(loss)(params, x, y)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(args.steps):
            params, state = step(params, state, x, y)

        stored = optax.tree_utils.tree_get(state, "noise", ())
        for part, tree in (("params", params), ("noise", stored)):
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                local[f"{run}/{part}{jax.tree_util.keystr(path)}"] = host_copy(leaf)
        local[f"{run}/loss"] = host_copy(evaluate(params, x, y))
    np.savez(args.out, **local)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
