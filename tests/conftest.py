"""Test configuration: float64 for reference comparisons, 8 host devices for sharding tests.

Most of the suite's time is XLA compiling many small programs; the tests check values, not
speed, so the CPU backend is told to compile with cheap optimisation passes.
"""

import os

_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
_current = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_current, *[f for f in _FLAGS if f.split("=")[0] not in _current]]
).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
