"""Sphinx configuration: MyST pages, executed MyST-NB tutorials, the API
reference generated from the docstrings, and MathJax served from the build
itself (sphinx-mathjax-offline vendors it), so the build needs no network."""

import pathlib

import optax_antipgd

project = "optax_antipgd"
author = "optax_antipgd developers"
copyright = "the optax_antipgd developers"
release = optax_antipgd.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
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

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# The tutorials run at every build; an error in a cell fails it.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 120
nb_execution_show_tb = True
# Markdown that cells display (the Reproducing page's tables) is parsed as MyST.
nb_render_markdown_format = "myst"

# docs/results/ holds the committed runs that reproducing.md reads (their
# results.md is not a page).
exclude_patterns = ["_build", "jupyter_execute", "results"]
html_theme = "sphinx_book_theme"
html_title = f"optax_antipgd {release}"
html_theme_options = {"show_toc_level": 2}

# Every public name must be in the reference: fail the build otherwise.
_api = (pathlib.Path(__file__).parent / "api.rst").read_text()
_missing = [name for name in optax_antipgd.__all__ if f":: {name}\n" not in _api]
if _missing:
    raise RuntimeError(f"docs/api.rst does not document {_missing}.")
