"""A ``lax.cond`` that stays a conditional under ``jax.vmap``.

Under ``jax.vmap`` a ``lax.cond`` on a batched predicate becomes a select,
which runs both branches. The library's conditionals are there to run one:
the tree check calls back to the host only when it fails, and a draw is the
result of a conditional so that it is computed once, into memory (a select
would fuse it into each of its readers again). The batching rule below
reduces the predicate over the batch instead.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def cond_all(
    pred: jax.Array,
    true_fn: Callable[[Any], Any],
    false_fn: Callable[[Any], Any],
    operand: Any,
) -> Any:
    """``true_fn(operand)`` if ``pred``, else ``false_fn(operand)``: one conditional.

    Under ``jax.vmap``, ``true_fn`` runs (batched) only when ``pred`` holds
    for the whole batch, ``false_fn`` otherwise: ``false_fn`` must give the
    right result also where ``pred`` holds.
    """

    @jax.custom_batching.custom_vmap
    def cond(pred, operand):
        return jax.lax.cond(pred, true_fn, false_fn, operand)

    @cond.def_vmap
    def _(axis_size, in_batched, pred, operand):
        pred_batched, operand_batched = in_batched
        if pred_batched:
            pred = jnp.all(pred)
        if not any(jax.tree.leaves(operand_batched)):
            out = cond_all(pred, true_fn, false_fn, operand)
            return out, jax.tree.map(lambda _: False, out)
        axes = jax.tree.map(lambda batched: 0 if batched else None, operand_batched)
        batched = [jax.vmap(fn, in_axes=(axes,)) for fn in (true_fn, false_fn)]
        out = cond_all(pred, *batched, operand)
        return out, jax.tree.map(lambda _: True, out)

    return cond(pred, operand)
