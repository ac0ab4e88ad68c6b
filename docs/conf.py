"""Sphinx configuration: the API reference, generated from the docstrings."""

import pathlib

import optax_antipgd

project = "optax_antipgd"
author = "optax_antipgd developers"
copyright = "the optax_antipgd developers"
release = optax_antipgd.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# The docstrings are Google style, as in optax.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
# The hints of optax.ScalarOrSchedule expand to a page-wide union: the Args
# sections say what each argument takes.
autodoc_typehints = "none"
autodoc_preserve_defaults = True

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = f"optax_antipgd {release}"

# Every public name must be in the reference: fail the build otherwise.
_api = (pathlib.Path(__file__).parent / "api.rst").read_text()
_missing = [name for name in optax_antipgd.__all__ if f":: {name}\n" not in _api]
if _missing:
    raise RuntimeError(f"docs/api.rst does not document {_missing}.")
