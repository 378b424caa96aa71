"""Shared test setup."""
import os

# Tests run on the CPU; several of them want a mesh of fake devices. This must happen before jax starts.
# Tests are dominated by XLA compile time on tiny models, and LLVM's optimisation passes are most of it
# (about 40% of a tiny U-Net's compile); the numbers do not depend on them.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

# Tests compile many small programs, several of them more than once (subprocess CLI runs, resumed trainers);
# a per-session persistent cache lets the repeats skip XLA. Subprocesses read it through the same variable.
os.environ.setdefault("DIFFUSION_JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="dj_xla_cache_"))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["DIFFUSION_JAX_COMPILATION_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
