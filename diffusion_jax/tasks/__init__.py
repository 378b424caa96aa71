"""Built-in tasks register themselves on import."""
from diffusion_jax.tasks import diffusion  # noqa: F401
from diffusion_jax.tasks import contrastive  # noqa: F401
from diffusion_jax.tasks import autoencoder  # noqa: F401
