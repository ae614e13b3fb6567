"""Test setup: 8 simulated CPU devices, set before JAX initialises any backend."""

import meshjax.devices

meshjax.devices.use_cpu_devices(8)
