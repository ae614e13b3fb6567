"""Test setup for the tests and the docstring examples (``--doctest-modules meshjax``): 8 simulated
CPU devices, set before JAX initialises any backend, and the names every example may use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshjax
import meshjax.devices

meshjax.devices.use_cpu_devices(8)


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, np=np, mj=meshjax)
