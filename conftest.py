"""Test setup for the tests and the docstring examples (``--doctest-modules meshjax``): 8 simulated
CPU devices, set before JAX initialises any backend, a compilation cache for this run, and the
names every example may use."""

import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshjax
import meshjax.devices

meshjax.devices.use_cpu_devices(8)

# XLA's persistent cache, in a directory of this run's own: a program that several tests (or CLI
# calls) build again, identical, is compiled once and loaded after that. Nothing outlives the run,
# so every run compiles every program at least once; child processes (the CLI, notebooks, launched
# processes) do not inherit it.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="meshjax-test-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)


def pytest_unconfigure(config):
    shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, np=np, mj=meshjax)
