"""Masked-autoencoder pre-training (task='mae') on unlabelled images: `models.mae` on the shared trainer.

Each step masks `mae.mask_ratio` of every image's patches at random, encodes the rest and reconstructs the masked
ones; the loss is their mean squared error (`mae.norm_pix_loss`: against per-patch normalised pixels). The encoder is
the ViT tower `task='classify'` fine-tunes or probes (`classify.init_from` names this run).

Evaluation: the `reconstruction` evaluator reports, over held-out images with masks drawn from a fixed seed,
`masked_psnr` (PSNR in dB over the masked patches only, pixels in [0, 1]), `psnr` of the whole image with the visible
patches pasted back, `loss`. `--mode sample` writes original | masked (grey patches) | reconstruction triples of
`sample.num_images` held-out images.

Config: `model.*` the encoder (`vision_variant` or patch_size/width/layers/heads/mlp_ratio, act) and the decoder
(decoder_width/layers/heads, mlp_ratio); `mae.mask_ratio`, `mae.norm_pix_loss`; `sample.num_images`,
`sample.batch_size`, `sample.seed`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.config import ConfigError, compute_dtype
from diffusion_jax.eval import image_io, image_metrics
from diffusion_jax.models import remat
from diffusion_jax.models.mae import MAE, MAEConfig, masked_mse, patchify, unpatchify
from diffusion_jax.models.vit import CLIPVisionConfig, vit_config
from diffusion_jax.parallel import host
from diffusion_jax.train.evaluators import split_outputs
from diffusion_jax.train.task import ModelContext, Task, register


def vision_config(config, **fields) -> CLIPVisionConfig:
  """The ViT tower the `model` section describes (by `vision_variant` or by field), with `fields` on top."""
  m, d = config.model, config.data
  common = dict(image_size=d.image_size, channels=d.channels, act=m.act, dtype=compute_dtype(m.compute_dtype),
                attention_impl=m.attention_impl or None, remat=remat.from_config(m), **fields)
  try:
    if m.vision_variant:
      return vit_config(m.vision_variant, **common)
    return CLIPVisionConfig(patch_size=m.patch_size, width=m.width, layers=m.layers, heads=m.heads,
                            mlp_dim=m.width * m.mlp_ratio, **common)
  except ValueError as e:
    raise ConfigError(f"model: {e}") from None


def mae_config(config) -> MAEConfig:
  m, e = config.model, config.mae
  encoder = vision_config(config, pooling="cls", pre_norm=False, patch_bias=True, fixed_positions=True,
                          layer_norm_eps=1e-6)
  try:
    return MAEConfig(encoder=encoder, decoder_width=m.decoder_width, decoder_layers=m.decoder_layers,
                     decoder_heads=m.decoder_heads, decoder_mlp_dim=m.decoder_width * m.mlp_ratio,
                     mask_ratio=float(e.mask_ratio), norm_pix_loss=bool(e.norm_pix_loss))
  except ValueError as err:
    raise ConfigError(f"mae: {err}") from None


@register("mae")
class MAETask(Task):

  def __init__(self, config):
    super().__init__(config)
    self.model_config = mae_config(config)

  def build_model(self, rngs: nnx.Rngs) -> MAE:
    return MAE(self.model_config, rngs=rngs)

  def loss(self, model: MAE, batch, rng):
    loss, _, _ = model(batch["image"], rng=rng, weights=batch["valid"])
    return loss, {}

  # ------------------------------------------------------------------ evaluation
  def _measure(self, model: MAE, images, key):
    noise = jax.random.uniform(key, images.shape[:1] + (self.model_config.num_patches,))
    latent, mask, restore = model.encode(images, noise)
    pred = model.decode(latent, restore)
    rec = jnp.clip(model.reconstruct(images, pred, mask), -1.0, 1.0)
    patch, channels = self.model_config.encoder.patch_size, self.model_config.encoder.channels
    target = patchify(images.astype(jnp.float32), patch)
    a, b = image_metrics.signed_to_unit(images.astype(jnp.float32)), image_metrics.signed_to_unit(rec)
    se = jnp.mean(jnp.square(patchify(a, patch) - patchify(b, patch)), axis=-1)  # [B, N]
    masked_mse_unit = jnp.sum(se * mask, axis=1) / jnp.sum(mask, axis=1)
    shown = unpatchify(jnp.where(mask[..., None] > 0, 0.0, target), patch, channels)
    loss = jnp.sum(masked_mse(pred, target, mask, self.model_config.norm_pix_loss), axis=1) / jnp.sum(mask, axis=1)
    return rec, shown, {"masked_psnr": -10.0 * jnp.log10(masked_mse_unit), "psnr": image_metrics.psnr(a, b),
                        "loss": loss}

  def measure_split(self, ctx: ModelContext, split: str, batch_size: int, max_examples: int
                    ) -> dict[str, np.ndarray]:
    """Per held-out image: masked_psnr, psnr, loss, and the images (original, masked, rec); the masks are drawn
    from `sample.seed` and the batch's position, so every evaluation masks the same patches."""
    fn = ctx.jit(self._measure)
    base = jax.random.key(int(self.config.sample.seed))
    count = [0]

    def one(batch):
      rec, shown, scores = fn(batch["image"], jax.random.fold_in(base, count[0]))
      count[0] += 1
      return dict(scores, image=batch["image"], masked=shown, rec=rec)

    return split_outputs(ctx, self.config.data, split, batch_size, one, max_examples=max_examples)

  def heldout_outputs(self, ctx: ModelContext, images: np.ndarray, seed: int) -> np.ndarray:
    """Reconstructions (visible patches kept) of images [N, H, W, C] in [-1, 1] under masks drawn from `seed`."""
    fn = ctx.jit(lambda model, x, key: self._measure(model, x, key)[0], key=(self, "heldout"))
    key = jax.random.key(seed)
    return host.run_chunked(lambda x: fn(x, key), np.asarray(images, np.float32),
                            min(int(self.config.sample.batch_size), len(images)))

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    """original | masked | reconstruction triples of `sample.num_images` held-out images, one triple per row."""
    s = self.config.sample
    got = self.measure_split(ctx, self.config.data.eval_split, int(s.batch_size), int(s.num_images))
    if not ctx.is_main_process:
      return {}
    images, prompts, extra = [], [], []
    for i in range(len(got["image"])):
      images += [got["image"][i], got["masked"][i], got["rec"][i]]
      prompts += ["original", "masked", "reconstruction"]
      record = {"triple": i, "masked_psnr": float(got["masked_psnr"][i]), "psnr": float(got["psnr"][i])}
      extra += [record] * 3
    return image_io.save_samples(out_dir, np.clip(np.stack(images), -1.0, 1.0), prompts,
                                 grid_cols=3 * int(s.triples_per_row), extra=extra)

