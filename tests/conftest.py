"""Shared test setup."""
import os

# Tests run on the CPU; several of them want a mesh of fake devices. This must happen before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
