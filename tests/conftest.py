"""Fixtures shared by the test files."""

import jax
import pytest


@pytest.fixture
def x64():
  """float64 inside one test only (references where JAX allows them)."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", previous)
