"""Loud failures: rank promotion raises, as in optimistix and equinox."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
