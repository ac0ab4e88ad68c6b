"""The code in the README and the docs pages runs as written, and checks what
it claims.

Every self-contained snippet (one that imports optax_antipgd) of README.md and
docs/*.md runs, and each ends in assertions about what it computed: a snippet
that stops computing what it says fails here. Fragments that name a training
loop's variables say so in the text before them. The tutorials in
docs/tutorials/ are notebooks executed by the docs build (`bash .ci/docs`).
"""

import pathlib
import re

import jax
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
