"""Trees: which leaves take part (float leaves), and whether a tree is init's.

A noise state knows the tree ``init`` saw in one of two ways: by the
structure of its stored noise (static: checked when tracing, naming the
paths that differ), or, with nothing stored, by a digest of the paths and
shapes (data: checked at once when concrete, and under ``jax.jit`` by a host
callback that runs only when the digests differ). :func:`match` does both.
"""

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_antipgd import _cond
from optax_antipgd import _keys


def is_float(leaf: Any, path: Any = ()) -> bool:
    """Whether ``leaf`` is real floating point; complex leaves are refused.

    Args:
      leaf: An array, a scalar or a ``jax.ShapeDtypeStruct``.
      path: The leaf's path in its tree, named in the error.

    Raises:
      TypeError: For a complex leaf, naming its path.
    """
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        where = f" at {jax.tree_util.keystr(tuple(path))}" if path else ""
        raise TypeError(
            f"complex leaves are not supported: the leaf{where} has dtype {dtype}. "
            "Split it into real and imaginary parts (two float leaves)."
        )
    return bool(jnp.issubdtype(dtype, jnp.floating))


def check_leaves(tree: Any) -> None:
    """Refuses a tree with complex leaves, naming the first one's path."""
    jax.tree_util.tree_map_with_path(lambda path, leaf: is_float(leaf, path), tree)


def wide_dtype(tree: Any) -> Any:
    """float64 if a float leaf of ``tree`` is float64, else float32.

    The dtype of a state's scales and filter: float64 leaves draw float64
    noise with a float64 ``sigma`` and coefficients.
    """
    dtypes = {jnp.result_type(leaf) for leaf in jax.tree.leaves(tree)}
    return jnp.float64 if jnp.dtype(jnp.float64) in dtypes else jnp.float32


def carries_noise(leaf: Any) -> bool:
    """Whether an entry is an array that noise is added to (not a stub)."""
    return leaf is not None and not isinstance(leaf, optax.MaskedNode)


def is_stub(node: Any) -> bool:
    """A node with no leaves that marks a place: ``None`` or ``optax.MaskedNode``."""
    return node is None or isinstance(node, optax.MaskedNode)


def entries(tree: Any) -> tuple[list[tuple[tuple[Any, ...], Any]], Any]:
    """``(normalized path, leaf)`` of every leaf, ``None`` and ``MaskedNode``."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_stub)
    return [(_keys.normalized_path(path), leaf) for path, leaf in paths_leaves], treedef


def _describe(leaf: Any) -> str:
    if leaf is None:
        return "None"
    if isinstance(leaf, optax.MaskedNode):
        return "masked"
    return f"{jnp.result_type(leaf)}{list(jnp.shape(leaf))}"


def _shape(leaf: Any) -> str:
    return _describe(leaf) if is_stub(leaf) else str(list(jnp.shape(leaf)))


def digest(tree: Any) -> np.ndarray:
    """A uint32[2] digest of ``tree``'s paths and shapes.

    Not of the dtypes: updates may come in another float dtype than the
    params (bf16 params, f32 updates), and ``optax.sgd`` turns the updates of
    int params into floats, and still it is the same tree.
    """
    text = ";".join(
        f"{jax.tree_util.keystr(path)}:{_shape(leaf)}"
        for path, leaf in entries(tree)[0]
    )
    return np.frombuffer(
        hashlib.blake2b(text.encode(), digest_size=8).digest(), dtype="<u4"
    ).copy()


def _masked_ancestor(path, index_of, reference_entries) -> int | None:
    """The index of the reference ``MaskedNode`` above ``path``, if any."""
    for end in range(len(path) - 1, -1, -1):
        index = index_of.get(path[:end])
        if index is not None and isinstance(
            reference_entries[index][1], optax.MaskedNode
        ):
            return index
    return None


def align(reference: Any, tree: Any, what: str, *, dtypes: bool) -> list[int]:
    """For each entry of ``tree``, the index of the ``reference`` entry it is.

    Entries are matched by normalized path. A leaf of ``tree`` under a
    ``MaskedNode`` of ``reference`` maps to that node's index (it passes
    through). Float leaves of ``reference`` must match in shape (and dtype,
    with ``dtypes``).

    Raises:
      ValueError: Naming the paths that differ, if ``tree`` is not the tree
        ``reference`` was built for.
    """
    reference_entries, _ = entries(reference)
    index_of = {path: index for index, (path, _) in enumerate(reference_entries)}
    positions, unexpected, mismatched = [], [], []
    for path, leaf in entries(tree)[0]:
        index = index_of.get(path)
        if index is None:
            index = _masked_ancestor(path, index_of, reference_entries)
            if index is None:
                unexpected.append(path)
                continue
        positions.append(index)
        expected = reference_entries[index][1]
        if leaf is None and not is_stub(expected):
            mismatched.append((path, _describe(leaf), _describe(expected)))
        elif not is_stub(expected) and not is_stub(leaf):
            same = (
                jnp.shape(leaf) == jnp.shape(expected)
                and is_float(leaf) == is_float(expected)
                and (not dtypes or jnp.result_type(leaf) == jnp.result_type(expected))
            )
            if not same:
                mismatched.append((path, _describe(leaf), _describe(expected)))
    matched = set(positions)
    missing = [
        path
        for index, (path, _) in enumerate(reference_entries)
        if index not in matched
    ]
    if unexpected or missing or mismatched:
        problems = [f"{jax.tree_util.keystr(p)} is not in it" for p in unexpected[:5]]
        problems += [f"{jax.tree_util.keystr(p)} is missing" for p in missing[:5]]
        problems += [
            f"{jax.tree_util.keystr(p)} is {got}, not {want}"
            for p, got, want in mismatched[:5]
        ]
        raise _wrong_tree(what, problems)
    return positions


def _wrong_tree(what: str, problems: list[str]) -> ValueError:
    return ValueError(
        f"{what} is not the tree the noise state was built for (by init)"
        + (": " + "; ".join(problems) if problems else ": its paths or shapes differ")
        + ". Pass the tree given to opt.init (the same paths, shapes and "
        "dtypes): e.g. params, not {'params': params}, and "
        "nnx.state(model, nnx.Param), not nnx.state(model)."
    )


def match(
    reference: Any | None,
    state_digest: jax.Array,
    tree: Any,
    what: str,
    *,
    dtypes: bool = False,
) -> list[int]:
    """Refuses ``tree`` unless it is the tree ``init`` saw; returns its positions.

    With a ``reference`` (a tree of arrays or ``jax.ShapeDtypeStruct`` laid
    out as init's tree: a slot of the stored noise), ``tree``'s entries are
    matched by path to its entries (:func:`align`). Without, ``tree``'s digest
    must equal ``state_digest``; under ``jax.jit`` a conditional calls back to
    the host only when they differ, so a right tree costs one compare
    (:func:`_check_on_host`).

    Raises:
      ValueError: Naming what differs (or, from a digest, that it differs).
    """
    if reference is not None:
        return align(reference, tree, what, dtypes=dtypes)
    expected = digest(tree)
    if not isinstance(state_digest, jax.core.Tracer):
        if not np.array_equal(np.asarray(state_digest), expected):
            raise _wrong_tree(what, [])
    else:
        _check_on_host(jnp.all(state_digest == jnp.asarray(expected)), what)
    return list(range(len(entries(tree)[0])))


def _check_on_host(same: jax.Array, what: str) -> None:
    """Raises on the host, at run time, where ``same`` is false.

    A conditional calls back only when the check fails, also under
    ``jax.vmap`` (:func:`optax_antipgd._cond.cond_all`). A program with a
    host callback leaves jax's C++ dispatch (a small CNN's training step:
    0.81 ms against 0.47 ms), so only the states that need the check have
    it: those that regenerate past draws.
    """

    def raise_on_host():
        raise _wrong_tree(what, [])

    _cond.cond_all(
        same, lambda _: None, lambda _: jax.debug.callback(raise_on_host), None
    )
