"""tcmalloc for the CLI: XLA:CPU runs much faster with it than with glibc's malloc.

XLA's CPU runtime allocates and frees large buffers for every op. glibc's malloc returns big blocks to the kernel
and maps them again each time, so a 2-core machine spends a large share of its CPU time in the kernel (52 s of a
178 s `mnist_ddpm` run). tcmalloc keeps those blocks: the same 200 training steps ran at 1.93 instead of 1.52 steps/s
with 6 s in the kernel (README, "Two commands on a fresh machine"). The allocator must be there before the process starts, so
`python -m diffusion_jax.main` runs itself again once with tcmalloc in LD_PRELOAD when the library is installed
(Debian/Ubuntu: `apt-get install libtcmalloc-minimal4`, which the README's commands run) and not yet loaded.
DIFFUSION_JAX_TCMALLOC=0 turns this off.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Mapping, Optional

SWITCH = "DIFFUSION_JAX_TCMALLOC"
INSTALL_HINT = "apt-get install libtcmalloc-minimal4"


def library() -> Optional[str]:
  """tcmalloc's shared library name when it is installed (Linux only), else None."""
  if not sys.platform.startswith("linux"):
    return None
  return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


def preload_environment(environ: Mapping[str, str]) -> Optional[dict]:
  """`environ` with tcmalloc added to LD_PRELOAD; None when it is there already, turned off or not installed."""
  preloaded = environ.get("LD_PRELOAD", "")
  if environ.get(SWITCH, "1") == "0" or "tcmalloc" in preloaded:
    return None
  name = library()
  if name is None:
    return None
  return dict(environ, LD_PRELOAD=f"{name} {preloaded}".strip())


def reexec_with_tcmalloc() -> None:
  """Replaces this process by the same command with tcmalloc preloaded (see the module docstring); returns
  without doing anything when there is nothing to add. Call it before any work: the process starts over."""
  environ = preload_environment(os.environ)
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def in_use() -> str:
  """What this process allocates with, for the run's log."""
  try:
    with open("/proc/self/maps") as f:
      if "tcmalloc" in f.read():
        return "tcmalloc"
  except OSError:
    return "the system's malloc"
  hint = "" if library() else f"; {INSTALL_HINT} makes CPU steps faster"
  off = " (DIFFUSION_JAX_TCMALLOC=0)" if os.environ.get(SWITCH) == "0" else ""
  return f"the system's malloc{off}{hint}"
