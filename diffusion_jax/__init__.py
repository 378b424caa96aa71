"""diffusion_jax: one JAX/Flax stack for contrastive and generative multimodal models."""
from diffusion_jax import xla_cpu as _xla_cpu

_xla_cpu.apply()  # before JAX reads XLA_FLAGS: CPU convolutions on every core (diffusion_jax/xla_cpu.py)

from flax import nnx as _nnx  # noqa: E402

# Models are built with logical axis names and placed by explicit `out_shardings` (parameters born sharded
# under `jax.jit`); eager sharding would instead demand a mesh wherever a model is constructed, e.g. in a notebook.
_nnx.use_eager_sharding(False)

__version__ = "0.1.0"
