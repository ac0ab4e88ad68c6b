"""The code in the README and the docs pages runs as written, and checks what
it claims.

Every self-contained snippet (one that imports optax_antipgd) of README.md and
docs/*.md runs, and each ends in assertions about what it computed: a snippet
that stops computing what it says fails here. Fragments that name a training
loop's variables say so in the text before them. The tutorials in
docs/tutorials/ are notebooks executed by the docs build (`bash .ci/docs`).
"""

import importlib.util
import pathlib
import re
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def snippets():
    return [
        pytest.param(block, page, id=f"{page.name}:{number}")
        for page in PAGES
        for number, block in enumerate(
            re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
        )
        if "import optax_antipgd as ap\n" in block
    ]


def test_the_readme_and_every_guide_page_with_code_have_asserting_snippets():
    pages = {param.values[1].name for param in snippets()}
    assert {"README.md", "index.md", "getting_started.md", "family.md"} <= pages
    assert {"flatness.md", "checkpointing.md"} <= pages
    for param in snippets():
        block = param.values[0]
        assert re.search(r"^assert ", block, flags=re.MULTILINE), block[:200]


@pytest.mark.parametrize("snippet, page", snippets())
def test_snippet_runs_and_its_assertions_hold(snippet, page):
    # Users' code broadcasts a bias over a batch; conftest.py makes implicit
    # rank promotion raise, to catch it in the library, not in a README.
    with jax.numpy_rank_promotion("allow"):
        exec(compile(snippet, str(page), "exec"), {})


def test_the_readme_is_a_landing_page_that_links_every_docs_page():
    readme = PAGES[0].read_text()
    assert len(readme) <= 12_000
    linked = set(re.findall(r"\]\(docs/([\w/]+)\.md", readme))
    pages = {page.stem for page in PAGES[1:]} - {"changelog"}  # CHANGELOG.md
    tutorials = {f"tutorials/{page.stem}" for page in ROOT.glob("docs/tutorials/*.md")}
    assert len(tutorials) >= 3
    assert pages | tutorials <= linked, (pages | tutorials) - linked


def _results():
    """docs/_results.py, the helpers that docs/reproducing.md computes with."""
    spec = importlib.util.spec_from_file_location("_results", ROOT / "docs/_results.py")
    module = sys.modules.setdefault("_results", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


# The paired differences that the README's Results paragraph quotes, in order:
# (run, experiment, a, b, metric) for the difference a - b.
ACCURACY = "test accuracy %"
README_RESULTS = [
    ("ce", "mnist1d-large-batch", "Anti-PGD", "GD", ACCURACY),
    ("ce", "mnist1d-large-batch", "Anti-PGD", "GD", "Tr H"),
    ("ce", "mnist1d-large-batch", "Anti-PGD", "SAM", ACCURACY),
    ("ce", "mnist-large-batch", "Anti-PGD", "GD", ACCURACY),
    ("mse", "mnist-large-batch", "Anti-PGD", "GD", "Tr H"),
    ("mse", "mnist-large-batch", "Anti-PGD", "GD", ACCURACY),
    ("ce", "mnist-minibatch", "Anti-SGD", "SGD+independent", ACCURACY),
    ("ce", "mnist1d-minibatch", "Anti-SGD", "SGD", ACCURACY),
    ("ce", "mnist-minibatch", "Anti-SGD", "SGD", ACCURACY),
    ("ce", "mnist-minibatch", "Anti-SGD", "SAM", ACCURACY),
]


def test_the_readme_results_are_those_of_the_committed_runs():
    results = _results()
    readme = PAGES[0].read_text()
    paragraph = " ".join(readme.split("\n## Results\n", 1)[1].split("\n## ")[0].split())
    quoted = re.findall(
        r"[+-]?[\d.]+ ± [\d.]+(?: points)?, \d+ of \d+ seeds", paragraph
    )
    runs = {name: results.load(name) for name in ("ce", "mse")}
    expected = [
        results.paired(runs[run].results[experiment], a, b, metric).text()
        for run, experiment, a, b, metric in README_RESULTS
    ]
    assert quoted == expected
    assert paragraph.count("±") == len(quoted)  # no number left unchecked
    assert runs["ce"].info["date"][:10] in paragraph


@pytest.mark.parametrize(
    "metric, diff, status",
    [
        ("test accuracy %", [1.0, 1.0, 1.0, 1.0, -0.5], "held"),  # 4 of 5, mean > std
        ("test accuracy %", [2.0, 2.0, 2.0, 0.0, 0.0], "few"),  # mean > std, 3 of 5
        ("test accuracy %", [0.2, -0.1, 0.2, -0.2, 0.05], "spread"),
        ("test accuracy %", [-1.0, -1.1, -0.9, -1.0, -1.2], "reversed"),
        ("Tr H", [-1.0, -1.1, -0.9, -1.0, -1.2], "held"),  # lower is favoured
        ("Tr H conv1", [-1.0, -1.1, -0.9, -1.0, -1.2], "held"),  # a layer's too
        ("lambda_max", [1.0, 1.1, 0.9, 1.0, 1.2], "reversed"),
    ],
)
def test_the_verdict_rule_of_the_reproducing_page(metric, diff, status):
    paired = _results().Paired(metric, np.asarray(diff))
    assert paired.status == status
