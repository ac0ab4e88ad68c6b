"""The README's code runs as written, and checks what it claims.

Every self-contained snippet (one that imports optax_antipgd) runs, and each
ends in assertions about what it computed: a snippet that stops computing
what it says fails here. The one-liners that show a convention name free
variables and are not meant to run alone.
"""

import pathlib
import re

import jax
import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"


def snippets():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if "import optax_antipgd as ap\n" in block]


def test_the_readme_has_runnable_snippets_that_assert():
    assert len(snippets()) >= 5
    for snippet in snippets():
        assert re.search(r"^assert ", snippet, flags=re.MULTILINE), snippet[:200]


@pytest.mark.parametrize(
    "snippet", snippets(), ids=lambda s: s.split("\n\n")[-1].split("\n")[0][:40]
)
def test_snippet_runs_and_its_assertions_hold(snippet):
    # Users' code broadcasts a bias over a batch; conftest.py makes implicit
    # rank promotion raise, to catch it in the library, not in a README.
    with jax.numpy_rank_promotion("allow"):
        exec(compile(snippet, str(README), "exec"), {})
