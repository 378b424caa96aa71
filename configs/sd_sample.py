"""Text-to-image sampling from a pretrained diffusers Stable Diffusion folder (no training).

  python -m diffusion_jax.main --mode sample --pretrained path/to/stable-diffusion-v1-5 --workdir /tmp/sd \
      --config configs/sd_sample.py --config.sample.prompts='("a photo of a cat",)' --config.sample.per_prompt=4

Images, index.jsonl and grid.png go to /tmp/sd/samples/pretrained/. Fields: see
diffusion_jax/sample_pretrained.py (the default config of a --pretrained run, so --config may be left out).
"""
from diffusion_jax.sample_pretrained import get_config  # noqa: F401
