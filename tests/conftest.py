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

# The modules whose tests wait on a long subprocess (8 fake devices, the quick
# reproduction) go first: with pytest-xdist's ``--dist loadscope`` (the default
# options) a module runs on one worker, and a long one started last is the
# whole suite's tail.
LONG_MODULES = ("test_scale_out.py", "test_examples.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONG_MODULES)
