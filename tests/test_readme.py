"""The README's usage snippets run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).parent.parent / "README.md"


def usage_snippets():
    text = README.read_text()
    usage = text[
        text.index("## Usage") : text.index("\n## ", text.index("## Usage") + 1)
    ]
    blocks = re.findall(r"```python\n(.*?)```", usage, flags=re.DOTALL)
    # Self-contained snippets import what they use; the one-liners that show
    # the two conventions name free variables and are not meant to run alone.
    return [
        block for block in blocks if block.startswith("import") or "\nimport" in block
    ]


def test_the_usage_section_has_runnable_snippets():
    assert len(usage_snippets()) >= 2


@pytest.mark.parametrize("snippet", usage_snippets())
def test_usage_snippet_runs(snippet):
    exec(compile(snippet, str(README), "exec"), {})
