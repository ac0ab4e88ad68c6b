"""Flatness diagnostics: the trace, the top eigenvalues and the spectral density.

All of them see the Hessian through Hessian-vector products only
(``_hvp.hessian_operator``); none forms the ``d x d`` matrix. Lanczos is
``matfree``'s Arnoldi iteration with full reorthogonalisation, guarded here
against breakdown (:func:`_lanczos`).
"""

from collections.abc import Callable
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import matfree.decomp

from optax_antipgd import _hvp
from optax_antipgd import _keys

Estimator = Literal["hutchinson", "hutch++"]
_ESTIMATORS = Estimator.__args__

# Lanczos has found an invariant subspace when a new residual is this many
# machine epsilons of |H q_j|, the product it was left of, or less. Cutting
# the tridiagonal matrix there moves its eigenvalues by at most that much,
# while continuing would normalise rounding noise into the basis (_lanczos).
_BREAKDOWN_EPS = 64


def _check_estimator(estimator: Any) -> str:
    if not isinstance(estimator, str) or estimator not in _ESTIMATORS:
        raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}.")
    return estimator


def _trace_terms(
    fn: Callable[[Any], jax.typing.ArrayLike],
    params: Any,
    key: _keys.Key,
    num_samples: Any,
    batch_size: Any,
    estimator: Any,
    min_residual: int,
) -> tuple[jax.Array, jax.Array]:
    """``(exact, forms)``: the trace estimate is ``exact + mean(forms)``.

    ``forms`` are i.i.d. given ``exact`` (Hutchinson's quadratic forms, or
    Hutch++'s on the deflated residual), so their sample standard deviation
    over ``sqrt(len(forms))`` is the standard error of the estimate.
    """
    num_samples = _hvp.check_count("num_samples", num_samples)
    estimator = _check_estimator(estimator)
    # Hutch++ spends 2 * (num_samples // 3) products on its sketch and basis.
    minimum = min_residual + (2 if estimator == "hutch++" else 0)
    if num_samples < minimum:
        raise ValueError(
            f"num_samples must be >= {minimum} for estimator={estimator!r}"
            f"{' with a standard error' if min_residual > 1 else ''}, "
            f"got {num_samples}."
        )
    batch_size = _hvp.check_batch_size(batch_size, num_samples)
    base_key = _keys.typed_key(key)
    hessian = _hvp.hessian_operator(fn, params)
    probe_keys = jax.random.split(base_key, num_samples)

    def quadratic_form(vector):
        return jnp.vdot(vector, hessian.matvec(vector))

    def hutchinson_form(probe_key):
        return quadratic_form(hessian.rademacher(probe_key))

    # Beyond d sketch vectors the low-rank part is exact: the rest is residual.
    num_sketch = min(num_samples // 3, hessian.dim) if estimator == "hutch++" else 0
    if not num_sketch:
        forms = _hvp.batched_map(hutchinson_form, probe_keys, batch_size)
        return jnp.zeros([], hessian.dtype), forms

    # Hutch++ in three stages of Hessian-vector products: H S for a Rademacher
    # sketch S; Q^T H Q for Q the orthonormal basis of H S, whose trace is
    # exact on span(Q); Hutchinson on the rest, (I - Q Q^T) z. One scan over
    # the stages holds the one product site, so the HVP compiles once.
    num_residual = num_samples - 2 * num_sketch
    rows = max(num_sketch, num_residual)
    sketch_keys = probe_keys[:num_sketch]
    residual_keys = probe_keys[2 * num_sketch :]

    def pad(vectors):
        return jnp.pad(vectors, ((0, rows - vectors.shape[0]), (0, 0)))

    def probes(keys):
        return jax.vmap(hessian.rademacher)(keys)

    def stage(carry, index):
        products, basis = carry
        basis = jax.lax.cond(
            index == 1,
            lambda: jnp.linalg.qr(products[:num_sketch].T)[0].T.astype(basis.dtype),
            lambda: basis,
        )
        vectors = jax.lax.switch(
            index,
            [
                lambda: pad(probes(sketch_keys)),
                lambda: pad(basis),
                lambda: pad(_deflated(probes(residual_keys), basis)),
            ],
        )
        products = _hvp.batched_map(hessian.matvec, vectors, batch_size)
        return (products, basis), jnp.sum(vectors * products, axis=-1)

    start = (
        jnp.zeros((rows, hessian.dim), hessian.dtype),
        jnp.zeros((num_sketch, hessian.dim), hessian.dtype),
    )
    _, forms = jax.lax.scan(stage, start, jnp.arange(3))
    exact = jnp.sum(forms[1, :num_sketch])
    return exact, forms[2, :num_residual]


def _deflated(vectors: jax.Array, basis: jax.Array) -> jax.Array:
    """``(I - Q Q^T) v`` for each row ``v``, ``Q`` the orthonormal rows of ``basis``."""
    return vectors - (vectors @ basis.T) @ basis


def hessian_trace(
    fn: Callable[[Any], jax.typing.ArrayLike],
    params: Any,
    key: _keys.Key,
    *,
    num_samples: int = 64,
    batch_size: int | None = None,
    estimator: Estimator = "hutchinson",
) -> jax.Array:
    r"""Stochastic estimate of the trace of the Hessian of ``fn`` at ``params``.

    Hutchinson's estimator (the default) averages quadratic forms of
    Rademacher probes:

    .. math::

        \operatorname{Tr} H \approx \frac{1}{S} \sum_{s=1}^{S} z_s^\top H z_s,
        \qquad z_s \in \{-1, +1\}^d \text{ i.i.d.}, \quad H = \nabla^2 f(w).

    It is unbiased; its variance is :math:`2 (\|H\|_F^2 - \sum_i H_{ii}^2) / S`,
    so it is exact for a diagonal Hessian. ``estimator="hutch++"`` spends the
    same :math:`S` Hessian-vector products differently: :math:`k = \lfloor S/3
    \rfloor` on a sketch :math:`H Z` whose orthonormal basis :math:`Q` captures
    the large eigenvalues, :math:`k` on the exact trace of :math:`H` on that
    subspace, and the :math:`S - 2k` left on Hutchinson's estimate of the rest:

    .. math::

        \operatorname{Tr} H \approx \operatorname{Tr}(Q^\top H Q)
        + \frac{1}{S - 2k} \sum_{s} g_s^\top P H P g_s,
        \qquad Q = \operatorname{orth}(H Z), \quad P = I - Q Q^\top.

    Also unbiased, Hutch++ is far more accurate when a few eigenvalues
    dominate (a trained network's Hessian: a few outliers over a bulk near 0):
    it is exact when :math:`H` has rank :math:`\le k`, and for a positive
    semi-definite :math:`H` its relative error falls as :math:`1/S` instead of
    :math:`1/\sqrt{S}`. When no eigenvalue stands out it is worse, as it
    spends two thirds of its products on a subspace that holds no more than
    its share of the trace; more so when the spectrum sits around a large
    mean, since Rademacher Hutchinson is exact on a multiple of the identity
    and Hutch++'s projected probes are not. Measured RMS errors, Hutch++ over
    Hutchinson, at :math:`d = 100` and :math:`S = 64`: 0.024 with five
    eigenvalues of 100 over a bulk in [0, 1]; 1.1 with eigenvalues spread
    evenly over [-1, 1]; 1.7 over [0, 1]. :func:`hessian_trace_with_stderr`
    gives the standard error of either.

    Each Hessian-vector product is forward-over-reverse (``jax.jvp`` of
    ``jax.grad``): about the cost of two gradients. This is the flatness that
    Anti-PGD's implicit regulariser :math:`\frac{\sigma^2}{2} \operatorname{Tr}
    \nabla^2 L` penalises.

    ``params`` may be any pytree. Float leaves are differentiated; int and bool
    leaves are held constant (they have no Hessian). The function is pure and
    jit-able; ``params`` and ``key`` may be tracers.

    Cost: ``num_samples`` Hessian-vector products, whichever the estimator.
    By default all of them are evaluated at once (``jax.vmap``): memory grows
    as ``num_samples`` times the size of the params and of ``fn``'s
    activations. ``batch_size`` bounds it, evaluating ``batch_size`` products
    at a time with ``jax.lax.map``; the result is the same to rounding.
    Hutch++ also keeps its basis, ``num_samples // 3`` params-sized vectors,
    and orthonormalises it (a QR, :math:`O(d S^2)`).

    Args:
      fn: A function of ``params`` returning a scalar, e.g. a loss with its
        data bound: ``lambda p: loss(p, x, y)``.
      params: The point at which the Hessian is taken, a pytree of arrays.
      key: An int seed, a raw ``uint32`` key (``jax.random.PRNGKey``), a typed
        key (``jax.random.key``, any impl) or a scalar integer array; it may
        be a tracer.
      num_samples: The number :math:`S` of Hessian-vector products, ``>= 1``
        (``>= 3`` for Hutch++).
      batch_size: The number of products evaluated at a time, ``>= 1``;
        ``None`` evaluates all at once. Need not divide ``num_samples``.
      estimator: ``"hutchinson"`` (default) or ``"hutch++"``.

    Returns:
      The estimate, a scalar in the dtype of ``fn``'s output (and of the
      params), at least float32.

    Raises:
      ValueError: If ``num_samples`` or ``batch_size`` is below 1 (below 3
        for ``num_samples`` with Hutch++), or ``estimator`` is unknown.
      TypeError: If ``num_samples`` or ``batch_size`` is not an int, if ``fn``
        does not return a real scalar, if ``params`` has complex leaves or if
        ``key`` is not a key.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_antipgd as ap
      >>> # The widening valley: Tr H = d * v^2 + |u|^2 = 4 * 0.25 + 4 = 5.
      >>> valley = lambda p: 0.5 * p["v"] ** 2 * jnp.sum(p["u"] ** 2)
      >>> params = {"u": jnp.ones(4), "v": jnp.asarray(0.5)}
      >>> trace = ap.hessian_trace(valley, params, key=0, num_samples=4096)
      >>> bool(jnp.abs(trace - 5.0) < 0.3)  # 5 standard deviations of the estimate
      True
      >>> # A Hessian of rank 1 (all ones): Hutch++'s sketch captures it, and
      >>> # its estimate is exact where Hutchinson's forms spread over 1 to 25.
      >>> rank_one = lambda x: 0.5 * jnp.sum(x) ** 2
      >>> trace = ap.hessian_trace(rank_one, jnp.zeros(5), key=0, num_samples=9,
      ...                          estimator="hutch++")
      >>> print(f"{float(trace):.4f}")
      5.0000

    References:
      Hutchinson, `A Stochastic Estimator of the Trace of the Influence Matrix
      for Laplacian Smoothing Splines
      <https://doi.org/10.1080/03610919008812866>`_, 1990

      Meyer et al, `Hutch++: Optimal Stochastic Trace Estimation
      <https://arxiv.org/abs/2010.09649>`_, 2021

      Orvieto et al, `Anticorrelated Noise Injection for Improved
      Generalization <https://arxiv.org/abs/2202.02831>`_, 2022
    """
    exact, forms = _trace_terms(
        fn, params, key, num_samples, batch_size, estimator, min_residual=1
    )
    return exact + jnp.mean(forms)


def _stderr(forms: jax.Array) -> jax.Array:
    """The standard error of the mean of i.i.d. ``forms``: their spread over sqrt(n)."""
    return jnp.std(forms, ddof=1) / jnp.sqrt(forms.shape[0])


def hessian_trace_with_stderr(
    fn: Callable[[Any], jax.typing.ArrayLike],
    params: Any,
    key: _keys.Key,
    *,
    num_samples: int = 64,
    batch_size: int | None = None,
    estimator: Estimator = "hutchinson",
) -> tuple[jax.Array, jax.Array]:
    r""":func:`hessian_trace` with the standard error of its estimate.

    Both estimators end with a mean of :math:`n` i.i.d. quadratic forms
    :math:`q_s`: Hutchinson's :math:`z_s^\top H z_s` (:math:`n = S`), or
    Hutch++'s :math:`g_s^\top P H P g_s` on the residual (:math:`n = S - 2k`;
    its low-rank part :math:`\operatorname{Tr}(Q^\top H Q)` is exact given
    :math:`Q` and adds no variance). The standard error is

    .. math::

        \widehat{\mathrm{se}} = \sqrt{\frac{1}{n (n - 1)} \sum_{s=1}^{n}
        (q_s - \bar q)^2},

    so ``estimate +- 2 * stderr`` covers the trace about 95% of the time when
    :math:`n` is a few tens or more (the mean is near normal). It costs
    nothing beyond :func:`hessian_trace`: the same probes, the same
    ``num_samples`` Hessian-vector products, the same estimate.

    Args:
      fn: A function of ``params`` returning a scalar.
      params: The point at which the Hessian is taken, a pytree of arrays.
      key: A key, as :func:`hessian_trace` takes it.
      num_samples: The number :math:`S` of Hessian-vector products: ``>= 2``
        for Hutchinson, ``>= 4`` for Hutch++ (two residual forms at least).
      batch_size: The number of products evaluated at a time; ``None``: all.
      estimator: ``"hutchinson"`` (default) or ``"hutch++"``.

    Returns:
      ``(estimate, stderr)``: two scalars; ``estimate`` equals
      :func:`hessian_trace`'s with the same arguments.

    Raises:
      ValueError: If ``num_samples`` is too small for a standard error,
        ``batch_size`` is below 1 or ``estimator`` is unknown.
      TypeError: As :func:`hessian_trace`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_antipgd as ap
      >>> matrix = jnp.array([[2.0, 1.0], [1.0, 3.0]])  # Tr = 5
      >>> quadratic = lambda x: 0.5 * x @ matrix @ x
      >>> trace, stderr = ap.hessian_trace_with_stderr(
      ...     quadratic, jnp.zeros(2), key=0, num_samples=1000)
      >>> bool(jnp.abs(trace - 5.0) < 5 * stderr)
      True
      >>> # Each form is 5 +- 2: the spread, sqrt(4 / 1000), is known here.
      >>> print(f"{float(stderr):.3f}")
      0.063

    References:
      Meyer et al, `Hutch++: Optimal Stochastic Trace Estimation
      <https://arxiv.org/abs/2010.09649>`_, 2021
    """
    exact, forms = _trace_terms(
        fn, params, key, num_samples, batch_size, estimator, min_residual=2
    )
    stderr = _stderr(forms)
    return exact + jnp.mean(forms), stderr


def _block_forms(fn, params, key, num_samples, batch_size, minimum):
    """Hutchinson's forms split by leaf: a tree of ``[num_samples]`` arrays.

    The probes of :func:`hessian_trace`: ``z_s . H z_s`` is the sum over
    leaves of ``z_s[leaf] . (H z_s)[leaf]``, each unbiased for the trace of
    that leaf's diagonal block.
    """
    num_samples = _hvp.check_count("num_samples", num_samples, minimum)
    batch_size = _hvp.check_batch_size(batch_size, num_samples)
    base_key = _keys.typed_key(key)
    hessian = _hvp.hessian_operator(fn, params)

    def block_form(probe_key):
        probe = hessian.rademacher(probe_key)
        return hessian.leaf_sums(probe * hessian.matvec(probe))

    probe_keys = jax.random.split(base_key, num_samples)
    return _hvp.batched_map(block_form, probe_keys, batch_size)


def hessian_block_traces(
    fn: Callable[[Any], jax.typing.ArrayLike],
    params: Any,
    key: _keys.Key,
    *,
    num_samples: int = 64,
    batch_size: int | None = None,
) -> Any:
    r"""The trace of each leaf's diagonal block of the Hessian: which layers are sharp.

    Write the Hessian in blocks by leaf, :math:`H = (H_{ab})`. The trace of
    a leaf's diagonal block, :math:`\operatorname{Tr} H_{aa}`, is the
    curvature that leaf carries, and the blocks' traces sum to
    :math:`\operatorname{Tr} H`. Hutchinson's probes give all of them at
    once: the part of each quadratic form :math:`z^\top H z` that falls on a
    leaf's entries, :math:`z_a^\top (H z)_a`, is an unbiased estimate of
    :math:`\operatorname{Tr} H_{aa}`,

    .. math::

        \operatorname{Tr} H_{aa} \approx \frac{1}{S} \sum_{s=1}^{S}
        z_{s,a}^\top (H z_s)_a, \qquad z_s \in \{-1, +1\}^d
        \text{ i.i.d.},

    with variance :math:`(2 (\|H_{aa}\|_F^2 - \sum_{i \in a} H_{ii}^2) +
    \sum_{b \ne a} \|H_{ab}\|_F^2) / S`: curvature shared with other leaves
    adds variance, not bias. The probes are those of :func:`hessian_trace` with
    ``estimator="hutchinson"``: with the same ``key`` and ``num_samples`` the
    leaves sum to its estimate, to rounding. Exact for a Hessian that is
    diagonal within each block and zero across them.

    ``params`` may be any pytree. Float leaves are differentiated; int and
    bool leaves are held constant and get 0. The function is pure and
    jit-able (and vmaps); ``params`` and ``key`` may be tracers. Cost and
    memory as :func:`hessian_trace`: ``num_samples`` Hessian-vector
    products, all at once unless ``batch_size`` bounds them.
    :func:`hessian_block_traces_with_stderr` adds the standard errors.

    Args:
      fn: A function of ``params`` returning a scalar.
      params: The point at which the Hessian is taken, a pytree of arrays.
      key: A key, as :func:`hessian_trace` takes it: it draws the probes.
      num_samples: The number :math:`S` of Hessian-vector products, ``>= 1``.
      batch_size: The number of products evaluated at a time, ``>= 1``;
        ``None`` evaluates all at once.

    Returns:
      A pytree with the structure of ``params``: at each leaf a scalar, the
      estimate of its block's trace (0 at int and bool leaves), in the dtype
      of :func:`hessian_trace`'s estimate (at least float32).

    Raises:
      ValueError: If ``num_samples`` or ``batch_size`` is below 1.
      TypeError: As :func:`hessian_trace`.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax_antipgd as ap
      >>> # Curvature 3 on a layer of 4 weights, 0.5 on one of 10; a step count.
      >>> loss = lambda p: 1.5 * jnp.sum(p["w1"] ** 2) + 0.25 * jnp.sum(p["w2"] ** 2)
      >>> params = {"w1": jnp.ones((2, 2)), "w2": jnp.ones(10), "step": jnp.asarray(7)}
      >>> blocks = ap.hessian_block_traces(loss, params, key=0, num_samples=8)
      >>> print({name: round(float(v), 4) for name, v in blocks.items()})
      {'step': 0.0, 'w1': 12.0, 'w2': 5.0}
      >>> trace = ap.hessian_trace(loss, params, key=0, num_samples=8)
      >>> bool(jnp.allclose(sum(jax.tree.leaves(blocks)), trace))
      True

    References:
      Hutchinson, `A Stochastic Estimator of the Trace of the Influence Matrix
      for Laplacian Smoothing Splines
      <https://doi.org/10.1080/03610919008812866>`_, 1990
    """
    forms = _block_forms(fn, params, key, num_samples, batch_size, minimum=1)
    return jax.tree.map(jnp.mean, forms)


def hessian_block_traces_with_stderr(
    fn: Callable[[Any], jax.typing.ArrayLike],
    params: Any,
    key: _keys.Key,
    *,
    num_samples: int = 64,
    batch_size: int | None = None,
) -> tuple[Any, Any]:
    r""":func:`hessian_block_traces` with the standard error of each estimate.

    Each block's estimate is a mean of ``num_samples`` i.i.d. forms
    :math:`q_s = z_{s,a}^\top (H z_s)_a`; its standard error is their sample
    standard deviation over :math:`\sqrt{S}`, as in
    :func:`hessian_trace_with_stderr` (0 where the forms do not vary: int and
    bool leaves, and blocks the probes see exactly). The same probes, the
    same products, the same estimates.

    Args:
      fn: A function of ``params`` returning a scalar.
      params: The point at which the Hessian is taken, a pytree of arrays.
      key: A key, as :func:`hessian_trace` takes it.
      num_samples: The number :math:`S` of Hessian-vector products, ``>= 2``.
      batch_size: The number of products evaluated at a time; ``None``: all.

    Returns:
      ``(traces, stderrs)``: two pytrees with the structure of ``params``;
      ``traces`` equals :func:`hessian_block_traces`'s.

    Raises:
      ValueError: If ``num_samples`` is below 2 or ``batch_size`` below 1.
      TypeError: As :func:`hessian_trace`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_antipgd as ap
      >>> matrix = jnp.array([[2.0, 1.0], [1.0, 3.0]])  # blocks: 2 and 3
      >>> fn = lambda p: 0.5 * jnp.stack([p["a"], p["b"]]) @ matrix @ jnp.stack(
      ...     [p["a"], p["b"]])
      >>> params = {"a": jnp.asarray(0.0), "b": jnp.asarray(0.0)}
      >>> traces, stderrs = ap.hessian_block_traces_with_stderr(
      ...     fn, params, key=0, num_samples=1000)
      >>> # Each block's form is its diagonal entry +- the coupling, 1.
      >>> print(round(float(stderrs["a"]), 3), round(float(stderrs["b"]), 3))
      0.032 0.032
      >>> bool(abs(traces["a"] - 2) < 0.2 and abs(traces["b"] - 3) < 0.2)
      True
    """
    forms = _block_forms(fn, params, key, num_samples, batch_size, minimum=2)
    traces = jax.tree.map(jnp.mean, forms)
    stderrs = jax.tree.map(_stderr, forms)
    return traces, stderrs


def _check_num_matvecs(num_matvecs: Any, dim: int) -> int:
    num_matvecs = _hvp.check_count("num_matvecs", num_matvecs)
    if dim < 1:
        raise ValueError("params must have at least one float leaf element.")
    # A Krylov space has at most d dimensions: more products would add nothing.
    return min(num_matvecs, dim)


def _lanczos(
    matvec: Callable[[jax.Array], jax.Array], start: jax.Array, num_matvecs: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lanczos' tridiagonal matrix of ``matvec`` from ``start``, without breakdown.

    ``matfree.decomp.hessenberg`` (Arnoldi, full reorthogonalisation; on a
    symmetric operator this is Lanczos) builds the basis. When the Krylov
    space of ``start`` becomes invariant (the Hessian has fewer distinct
    eigenvalues, as seen from ``start``, than ``num_matvecs``) the new
    residual is rounding noise; matfree normalises it into the basis, which
    then loses orthogonality, and the eigenvalues of its tridiagonal matrix
    leave the spectrum (for ``2 * I`` they spread over [-2.7, 6.7]), or it
    divides 0 by 0 (NaN). ``matfree.decomp.tridiag_sym`` symmetrises the
    matrix, which can hide the tiny residual norm; the Hessenberg matrix
    keeps it. So the iteration is cut at the first step ``j`` whose residual
    norm ``beta_j`` is at most ``_BREAKDOWN_EPS`` epsilons of the norm of
    column ``j`` of the Hessenberg matrix, about ``|H q_j|``: the residual is
    then what rounding leaves of ``H q_j`` after its projection on the basis,
    and the leading block holds the exact eigenvalues of the invariant
    subspace. The test is per column, not against the largest norm seen so
    far: on a network's spectrum (outliers orders of magnitude above a bulk
    near 0) a genuine bulk residual is tiny beside the outliers, and cutting
    there would stop the Krylov space although it is not invariant (a
    bulk of 298 eigenvalues in [0, 0.01] under outliers of 250 and 500
    collapsed to 8 nodes, its top eigenvalue returned as 0.0077).

    Returns:
      ``(alphas, betas, size)``: the diagonal ``[num_matvecs]`` and the
      off-diagonal ``[num_matvecs - 1]`` of the tridiagonal matrix, zero
      beyond its leading ``size x size`` block (``size`` an int32 scalar).
    """
    decompose = matfree.decomp.hessenberg(num_matvecs, reortho="full")
    _, hessenberg, _, _ = decompose(matvec, start)
    alphas = jnp.diagonal(hessenberg)
    betas = jnp.diagonal(hessenberg, offset=-1)  # the residual norms
    columns = jnp.linalg.norm(hessenberg[:, :-1], axis=0)  # about |H q_j|
    tolerance = _BREAKDOWN_EPS * jnp.finfo(betas.dtype).eps
    broken = ~(betas > tolerance * columns)  # NaN counts as broken
    size = jnp.where(jnp.any(broken), jnp.argmax(broken) + 1, num_matvecs)
    index = jnp.arange(num_matvecs)
    alphas = jnp.where(index < size, alphas, 0)
    betas = jnp.where(index[:-1] < size - 1, betas, 0)
    return alphas, betas, size.astype(jnp.int32)


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    return jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)


def _gershgorin_radii(betas: jax.Array) -> jax.Array:
    """Row ``i``'s off-diagonal sum ``|beta_{i-1}| + |beta_i|`` of the tridiagonal."""
    return jnp.abs(jnp.pad(betas, (1, 0))) + jnp.abs(jnp.pad(betas, (0, 1)))


def _tridiagonal_eigenvalues(
    alphas: jax.Array, betas: jax.Array, indices: jax.Array
) -> jax.Array:
    """Eigenvalues ``indices`` (0: the smallest) of the tridiagonal matrix.

    A dense solver is accurate to about ``eps * |T|`` in absolute terms: with
    outliers 1e5 times the bulk's width above it (a network's Hessian), that
    is 1% of the bulk (``jnp.linalg.eigvalsh`` in float32 returned the bulk's
    top, 0.02 under an outlier of 2000, as 0.0197). Sturm counts of the
    ``L D L^T`` pivots see each entry at its own scale (Kahan's bisection,
    LAPACK's ``stebz``), so bisected to the last bit they resolve the bulk to
    rounding of its own size.
    """
    dtype = alphas.dtype
    squares = jnp.concatenate([jnp.zeros(1, dtype), betas**2])
    pivot_floor = jnp.finfo(dtype).tiny * jnp.maximum(1, jnp.max(squares))

    def count_below(x):
        def pivot(d, entry):
            alpha, square = entry
            d = alpha - x - square / d
            d = jnp.where(jnp.abs(d) < pivot_floor, -pivot_floor, d)
            return d, d < 0

        _, negative = jax.lax.scan(pivot, jnp.ones([], dtype), (alphas, squares))
        return jnp.sum(negative)

    radius = _gershgorin_radii(betas)
    width = jnp.max(jnp.abs(alphas) + radius)

    def eigenvalue(index):
        def halve(_, bounds):
            lower, upper = bounds
            middle = 0.5 * (lower + upper)
            above = count_below(middle) <= index
            return jnp.where(above, middle, lower), jnp.where(above, upper, middle)

        # From |T| down to the spacing of floats near 0: the exponent range.
        lower, upper = jax.lax.fori_loop(
            0, 2 * jnp.finfo(dtype).nmant + 40, halve, (-width - 1, width + 1)
        )
        return 0.5 * (lower + upper)

    return jax.vmap(eigenvalue)(indices)


def hessian_eigenvalues(
    fn: Callable[[Any], jax.typing.ArrayLike],
    params: Any,
    key: _keys.Key,
    *,
    k: int = 1,
    num_matvecs: int = 64,
) -> jax.Array:
    r"""The ``k`` largest eigenvalues of the Hessian of ``fn`` at ``params``.

    Lanczos' iteration from a Gaussian start vector :math:`v` builds an
    orthonormal basis :math:`Q_m` of the Krylov space
    :math:`\operatorname{span}(v, Hv, \dots, H^{m-1} v)` and the tridiagonal
    :math:`T_m = Q_m^\top H Q_m`; the eigenvalues of :math:`T_m` (Ritz values)
    approach those of :math:`H` from inside, the extreme ones first, and
    fastest where they stand apart from the rest (the outliers of a network's
    Hessian). ``hessian_eigenvalues(...)[0]`` is the sharpness
    :math:`\lambda_{\max}` that SAM targets. The eigenvalues are the largest
    *algebraic* ones: a negative eigenvalue of large magnitude (a saddle)
    does not displace a smaller positive one.

    The basis is fully reorthogonalised (``matfree``). In exact arithmetic
    one start vector sees each distinct eigenvalue once: when the Hessian has
    fewer distinct eigenvalues than ``k`` (a multiple of the identity, a
    Hessian of small rank) the Krylov space is exhausted early, the iteration
    stops there and the missing entries are NaN. In floating point a
    repeated eigenvalue is split by rounding (by about ``eps * |H|``), and
    once Lanczos has converged to it, it may find the copies too (three
    eigenvalues of 300 in a random basis came back as 300 three times), as
    a dense solver lists them; or it may not, if the copies are not split.

    On a network's spectrum (a few outliers orders of magnitude above a
    narrow bulk near 0) the outliers converge first and the bulk is not
    lost under them: the iteration stops only where the Krylov space is
    invariant (:func:`_lanczos`), and the tridiagonal matrix's eigenvalues
    are bisected to the bulk's own rounding. Measured in float32, ``d =
    300``, 64 steps: outliers 2000 and 40 over a bulk in ``[-0.005, 0.02]``
    gave ``[2000.0, 40.0, 0.019999]``; 1000, 500, 250 over ``[0, 0.01]``
    gave all three to 1e-7.

    ``params`` may be any pytree; int and bool leaves are held constant. The
    function is pure and jit-able; ``params`` and ``key`` may be tracers.

    Cost: ``min(num_matvecs, d)`` Hessian-vector products (forward-over-reverse,
    about two gradients each), in sequence, plus :math:`O(d\, m^2)` for the
    reorthogonalisation; memory: the basis, ``min(num_matvecs, d)``
    params-sized vectors. The default, 64, gives the top few eigenvalues of a
    network's Hessian to a relative 1e-3 or better when they stand apart
    from the bulk; raise it for larger ``k`` or a crowded top of the spectrum
    (the ``k``-th is reliable with several times ``k`` products).

    Args:
      fn: A function of ``params`` returning a scalar.
      params: The point at which the Hessian is taken, a pytree of arrays.
      key: A key, as :func:`hessian_trace` takes it: it draws the start vector.
      k: The number of eigenvalues, ``1 <= k <= min(num_matvecs, d)`` where
        ``d`` is the number of float parameters.
      num_matvecs: The number of Lanczos steps, ``>= 1``; capped at ``d``
        (the Krylov space is then the whole space).

    Returns:
      The ``k`` largest eigenvalues, descending, an array ``[k]`` of the
      params' float dtype (at least float32).

    Raises:
      ValueError: If ``k`` or ``num_matvecs`` is below 1, if ``k`` exceeds
        ``num_matvecs`` or ``d``, or if ``params`` has no float element.
      TypeError: If ``k`` or ``num_matvecs`` is not an int, if ``fn`` does not
        return a real scalar, if ``params`` has complex leaves or if ``key``
        is not a key.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax_antipgd as ap
      >>> # The widening valley at u = (1, 1, 1, 1), v = 1/2: eigenvalues
      >>> # (4.25 +- sqrt(30.0625)) / 2 and v^2 = 0.25 (three times).
      >>> valley = lambda p: 0.5 * p["v"] ** 2 * jnp.sum(p["u"] ** 2)
      >>> params = {"u": jnp.ones(4), "v": jnp.asarray(0.5)}
      >>> top = ap.hessian_eigenvalues(valley, params, key=0, k=2)
      >>> print([round(float(value), 4) for value in top])
      [4.8665, 0.25]

    References:
      Lanczos, `An Iteration Method for the Solution of the Eigenvalue Problem
      of Linear Differential and Integral Operators
      <https://doi.org/10.6028/jres.045.026>`_, 1950

      Krämer et al, `Gradients of Functions of Large Matrices
      <https://arxiv.org/abs/2405.17277>`_, 2024 (``matfree``)

      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """
    k = _hvp.check_count("k", k)
    num_matvecs = _hvp.check_count("num_matvecs", num_matvecs)
    if k > num_matvecs:
        raise ValueError(
            f"k must be <= num_matvecs, got k={k} > num_matvecs={num_matvecs}."
        )
    base_key = _keys.typed_key(key)
    hessian = _hvp.hessian_operator(fn, params)
    num_matvecs = _check_num_matvecs(num_matvecs, hessian.dim)
    if k > hessian.dim:
        raise ValueError(
            f"k must be <= the number of float parameters, got k={k} > {hessian.dim}."
        )
    start = jax.random.normal(base_key, (hessian.dim,), hessian.dtype)
    alphas, betas, size = _lanczos(hessian.matvec, start, num_matvecs)
    # Fill the unused diagonal below the block's Gershgorin interval, so the
    # block's eigenvalues come first once sorted; the rest become NaN.
    index = jnp.arange(num_matvecs)
    radius = _gershgorin_radii(betas)
    lower = jnp.min(jnp.where(index < size, alphas - radius, jnp.inf))
    fill = lower - 1 - jnp.abs(lower)
    top = _tridiagonal_eigenvalues(
        jnp.where(index < size, alphas, fill), betas, num_matvecs - 1 - index[:k]
    )
    return jnp.where(index[:k] < size, top, jnp.nan)


def hessian_spectrum(
    fn: Callable[[Any], jax.typing.ArrayLike],
    params: Any,
    key: _keys.Key,
    *,
    num_matvecs: int = 64,
    num_samples: int = 8,
    batch_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""The spectral density of the Hessian of ``fn`` at ``params``, by SLQ.

    Stochastic Lanczos quadrature approximates the density of the
    eigenvalues :math:`\lambda_1, \dots, \lambda_d` of :math:`H`,
    :math:`\phi(t) = \frac{1}{d} \sum_i \delta(t - \lambda_i)`, by a discrete
    measure. For each of :math:`S` Rademacher probes :math:`z_s`, :math:`m`
    Lanczos steps from :math:`z_s` give a tridiagonal :math:`T_s = V_s
    \operatorname{diag}(\theta_s) V_s^\top`; its eigenvalues :math:`\theta_{s,j}`
    are the nodes and :math:`\tau_{s,j}^2 = (V_s)_{1j}^2`, the squared first
    entries of its eigenvectors, the weights of the Gauss quadrature of the
    probe's spectral measure:

    .. math::

        \phi(t) \approx \sum_{s=1}^{S} \sum_{j=1}^{m} w_{s,j}\,
        \delta(t - \theta_{s,j}), \qquad w_{s,j} = \tau_{s,j}^2 / S,

    exact in expectation for polynomials of degree :math:`\le 2m - 1` (for
    :math:`f(t) = t`: :math:`\sum w \theta` is Hutchinson's estimate of
    :math:`\operatorname{Tr} H / d`, with the probes of :func:`hessian_trace`
    for the same key and ``num_samples``).

    To plot a smooth density, put a Gaussian of width :math:`\sigma` on each
    node (the width is a choice: a few percent of the range resolves the
    bulk of a network's spectrum):

    .. code-block:: python

        import numpy as np

        nodes, weights = np.ravel(nodes), np.ravel(weights)
        width = 0.02 * (nodes.max() - nodes.min())
        grid = np.linspace(nodes.min() - 4 * width, nodes.max() + 4 * width, 512)
        kernel = np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / width) ** 2)
        density = kernel @ weights / (width * np.sqrt(2 * np.pi))
        # plt.semilogy(grid, density): the outliers are far below the bulk

    ``params`` may be any pytree; int and bool leaves are held constant. The
    function is pure and jit-able; ``params`` and ``key`` may be tracers.

    Cost: ``num_samples * min(num_matvecs, d)`` Hessian-vector products
    (forward-over-reverse), 512 with the defaults. The probes run at once
    (``jax.vmap``) unless ``batch_size`` is given; each probe in flight holds
    its Lanczos basis, ``min(num_matvecs, d)`` params-sized vectors, and
    ``fn``'s activations. Lanczos resolves the extreme eigenvalues first; 64
    steps per probe resolve the outliers and give the bulk's shape at a
    resolution of about its width over 64.

    Args:
      fn: A function of ``params`` returning a scalar.
      params: The point at which the Hessian is taken, a pytree of arrays.
      key: A key, as :func:`hessian_trace` takes it: it draws the probes.
      num_matvecs: The number :math:`m` of Lanczos steps per probe, ``>= 1``;
        capped at ``d``, the number of float parameters.
      num_samples: The number :math:`S` of probes, ``>= 1``.
      batch_size: The number of probes run at a time, ``>= 1``; ``None``
        runs all at once.

    Returns:
      ``(nodes, weights)``, two arrays ``[num_samples, min(num_matvecs, d)]``
      of the params' float dtype (at least float32): row ``s`` holds probe
      ``s``'s nodes, ascending, and their weights. Weights are ``>= 0`` and
      sum to 1 over the whole array (each row to ``1 / num_samples``). Where
      Lanczos stops early (the probe sees fewer than ``m`` distinct
      eigenvalues) the unused nodes repeat a used one with weight 0.

    Raises:
      ValueError: If ``num_matvecs``, ``num_samples`` or ``batch_size`` is
        below 1, or if ``params`` has no float element.
      TypeError: If a count is not an int, if ``fn`` does not return a real
        scalar, if ``params`` has complex leaves or if ``key`` is not a key.

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import optax_antipgd as ap
      >>> # Curvatures 1 (x3), 2 (x3) and 10 (x2): three clusters of mass.
      >>> curvature = jnp.array([1.0, 1, 1, 2, 2, 2, 10, 10])
      >>> fn = lambda x: 0.5 * jnp.sum(curvature * x**2)
      >>> nodes, weights = ap.hessian_spectrum(fn, jnp.zeros(8), key=0)
      >>> print(nodes.shape, round(float(weights.sum()), 4))
      (8, 8) 1.0
      >>> for value in (1, 2, 10):
      ...     near = jnp.abs(nodes - value) < 0.1
      ...     print(value, round(float(weights[near].sum()), 4))
      1 0.375
      2 0.375
      10 0.25

    References:
      Golub et al, `Matrices, Moments and Quadrature with Applications
      <https://press.princeton.edu/books/hardcover/9780691143415>`_, 2010

      Ubaru et al, `Fast Estimation of tr(f(A)) via Stochastic Lanczos
      Quadrature <https://doi.org/10.1137/16M1104974>`_, 2017

      Ghorbani et al, `An Investigation into Neural Net Optimization via
      Hessian Eigenvalue Density <https://arxiv.org/abs/1901.10159>`_, 2019
    """
    num_matvecs = _hvp.check_count("num_matvecs", num_matvecs)
    num_samples = _hvp.check_count("num_samples", num_samples)
    batch_size = _hvp.check_batch_size(batch_size, num_samples)
    base_key = _keys.typed_key(key)
    hessian = _hvp.hessian_operator(fn, params)
    num_matvecs = _check_num_matvecs(num_matvecs, hessian.dim)
    index = jnp.arange(num_matvecs)

    def quadrature(probe_key):
        probe = hessian.rademacher(probe_key)
        alphas, betas, size = _lanczos(hessian.matvec, probe, num_matvecs)
        # Unused entries are decoupled from the block, so their weight is 0;
        # alphas[0] keeps their nodes inside the spectrum.
        alphas = jnp.where(index < size, alphas, alphas[0])
        nodes, vectors = jnp.linalg.eigh(_tridiagonal(alphas, betas))
        return nodes, vectors[0] ** 2

    probe_keys = jax.random.split(base_key, num_samples)
    nodes, weights = _hvp.batched_map(quadrature, probe_keys, batch_size)
    return nodes, weights / num_samples
