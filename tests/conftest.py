"""Suite-wide settings.

- Loud failures: rank promotion raises, as in optimistix and equinox.
- The suite compiles thousands of small programs and runs each a few times:
  XLA compiles them without LLVM's optimizations, which changes the machine
  code, not what the tests compare (each compares results computed under the
  same setting). Set before jax starts its backend; subprocesses inherit it.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
).strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Longest first (seconds of work measured on 2 cores: 147, 116, 81, 66, 55,
# 54, 50; the rest under 20 each). With pytest-xdist's ``--dist loadscope
# --no-loadscope-reorder`` (the default options) a module runs on one worker,
# modules are handed out in this order, and a long one handed out last would
# be the whole suite's tail.
LONGEST_FIRST = (
    "test_noise.py",
    "test_scale_out.py",
    "test_examples.py",
    "test_checkpoint.py",
    "test_hessian.py",
    "test_draws.py",
    "test_properties.py",
)


def _rank(item):
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(items):
    items.sort(key=_rank)
