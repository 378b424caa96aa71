"""Shared test setup."""
import os

# Tests run on the CPU; several of them want a mesh of fake devices. This must happen before jax starts.
# Tests are dominated by XLA compile time on tiny models, and LLVM's optimisation passes are most of it
# (about 40% of a tiny U-Net's compile); the numbers do not depend on them.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

from diffusion_jax import allocator  # noqa: E402

# xdist's workers and the CLI's subprocesses start with tcmalloc when it is installed, as the CLI itself restarts
# with it (diffusion_jax/allocator.py): the tests' many small XLA programs spend far less time in the kernel.
_preloaded = allocator.preload_environment(os.environ)
if _preloaded is not None:
  os.environ["LD_PRELOAD"] = _preloaded["LD_PRELOAD"]

# Tests compile many small programs, several of them more than once (subprocess CLI runs, resumed trainers);
# a per-session persistent cache lets the repeats skip XLA. Subprocesses read it through the same variable.
os.environ.setdefault("DIFFUSION_JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="dj_xla_cache_"))

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["DIFFUSION_JAX_COMPILATION_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from absl import flags  # noqa: E402

# grain's worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

# Orbax saves a replicated array "replica-parallel" off GPUs: each of the 8 fake devices writes a slice of it, and
# every slice is a small program compiled per shape and device (a third of the unCLIP tests' three-run fixture).
# On one host that splits nothing real; saving each array from one replica (Orbax's choice on GPUs) writes the same
# values, restored alike. Subprocesses (CLI runs, one device each; launches) keep the default.
import orbax.checkpoint as ocp  # noqa: E402
from orbax.checkpoint._src.metadata import array_metadata_store  # noqa: E402

ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
    use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()), override=True)

# `pytest -n 2` runs each module in one worker (pytest.ini: --dist loadfile), handing modules out in collection order
# (--no-loadscope-reorder: xdist's default order, most tests first, would leave the slowest one-test modules for
# last, one worker running them while the other idles). The slowest modules go first, so the modules of a few
# seconds fill in at the end and both workers finish together. Measured on the 2-core CI machine
# (`PYTEST_ADDOPTS=--durations=100 bash .ci/run`, summed per module), slowest first.
SLOWEST_MODULES = (
    "test_notebooks.py", "test_latent_diffusion.py", "test_unclip_task.py", "test_sharding_strategies.py", "test_e2e_mnist_ddpm.py",
    "test_contrastive_task.py", "test_autoencoder_task.py", "test_gan.py", "test_lpips.py", "test_dit_task.py",
    "test_multiprocess.py", "test_memory_options.py", "test_recovery.py", "test_llava_task.py", "test_updates.py",
    "test_vae_elbo.py", "test_unclip_pipeline.py", "test_unet_parity.py", "test_unclip_ar_prior.py",
    "test_upsampler.py", "test_trainer.py", "test_cli.py", "test_eval.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others follow in file order
