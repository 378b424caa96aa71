"""XLA:CPU's convolutions on all cores: the one XLA flag the package sets, at import, before JAX starts a backend.

jaxlib 0.10 hands every convolution to YNNPACK (`ynn_fusion` in the optimised HLO), which runs it on one thread;
Eigen's convolutions, XLA's other CPU path, split each over XLA's intra-op threads. Removing convolutions from
YNNPACK's list (`FLAG`) leaves its dots and everything else as they were. On the 2-core machine the default
U-Net's eleven 3×3 convolution shapes (batch 64) took 24.0 / 23.6 / 47.9 ms on YNNPACK and 16.9 / 14.2 / 28.8 ms on
Eigen for forward / input gradient / kernel gradient (PyTorch: 11.8 / 11.9 / 12.6; `python -m
benchmarks.cpu_kernels`), and the U-Net training step went from 0.75-0.79× to 0.89-0.92× of diffusers' (`python -m
benchmarks.unet_train`); see benchmarks/README.md, "Where the time goes".

The flag is added to XLA_FLAGS when `import diffusion_jax` runs before JAX has started a backend, unless XLA_FLAGS
already sets `xla_cpu_experimental_ynn_fusion_type` (the user's choice wins) or DIFFUSION_JAX_EIGEN_CONV=0; a
process that computed on the CPU before the import is warned that it keeps XLA's default. XLA aborts the process on
a fusion type it does not know, so only jaxlib versions where the value was checked get it, and hosts with a TPU or
GPU plugin installed (whose own XLA also reads XLA_FLAGS, unchecked here) do not, unless JAX_PLATFORMS=cpu. The
flag changes nothing off the CPU.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import MutableMapping

NAME = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{NAME}=-individual_convolution"
SWITCH = "DIFFUSION_JAX_EIGEN_CONV"
CHECKED_JAXLIB = ("0.10.",)  # releases whose XLA knows `individual_convolution`
ACCELERATOR_PLUGINS = ("libtpu", "jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin")


def _jaxlib_version() -> str:
  try:
    from jaxlib import version
  except ImportError:
    return ""
  return version.__version__


def _backend_started() -> bool:
  """Whether XLA already read its flags; only possible when jax was imported (and used) before this package."""
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


def _accelerator_plugin() -> bool:
  return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def wanted(environ: MutableMapping[str, str], jaxlib_version: str, accelerator_plugin: bool = False) -> bool:
  """Whether `FLAG` should be added to `environ`'s XLA_FLAGS (see the module docstring)."""
  cpu_only = set(filter(None, environ.get("JAX_PLATFORMS", "").split(","))) == {"cpu"}
  return (environ.get(SWITCH, "1") != "0" and NAME not in environ.get("XLA_FLAGS", "")
          and jaxlib_version.startswith(CHECKED_JAXLIB) and (cpu_only or not accelerator_plugin))


def apply(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Adds `FLAG` to XLA_FLAGS when `wanted` and XLA has not read its flags yet; True when it did."""
  if not wanted(environ, _jaxlib_version(), _accelerator_plugin()):
    return False
  if _backend_started():
    import jax
    if jax.default_backend() == "cpu":
      warnings.warn(f"JAX computed before `import diffusion_jax`, so XLA runs each CPU convolution on one thread; "
                    f"import diffusion_jax first, or start Python with XLA_FLAGS={FLAG}", stacklevel=2)
    return False
  environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {FLAG}".strip()
  return True


def in_use() -> str:
  """What runs this process's CPU convolutions, for the run's log."""
  flags = os.environ.get("XLA_FLAGS", "")
  if FLAG in flags:
    return "Eigen (all cores)"
  if NAME in flags:
    return f"as XLA_FLAGS's {NAME} says"
  return "XLA's default"
