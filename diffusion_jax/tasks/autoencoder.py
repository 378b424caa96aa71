"""KL autoencoder training (the first stage of latent diffusion) on the shared trainer.

Loss, as in LDM's `LPIPSWithDiscriminator`:
  rec_loss + perceptual_weight · LPIPS(x, x̂) + kl_weight · KL / (H·W·C) + disc_factor · (d_weight · g_loss + d_loss)
rec_loss is the per-pixel mean |x - x̂| (or squared error). LDM sums the reconstruction error over pixels and adds
kl_weight · KL; dividing both by the pixel count keeps gradients O(1) for the optimizer's clipping while keeping
LDM's balance, so its kl_weight (1e-6) means the same here. LDM adds the per-image LPIPS distance to every pixel's
error, which is the same as adding it to their mean.

The optional PatchGAN discriminator lives in the same NNX module as the VAE, because the trainer has one model and
one optimizer. Both players are trained by one gradient of one scalar:
  * the generator term g_loss = -D(x̂) runs D with `stop_gradient` on D's parameters, so it moves only the VAE;
  * the discriminator's hinge loss d_loss sees `stop_gradient(x̂)`, so it moves only D.
The gradient of the sum is therefore exactly (∇_VAE generator loss, ∇_D discriminator loss), the two updates
taming-transformers makes with two optimizers. What is shared: the learning-rate schedule, Adam's betas, and
global-norm clipping over both gradient sets.

d_weight is taming's adaptive weight, ‖∇_W rec_loss‖ / ‖∇_W g_loss‖ (clipped to [0, 1e4], times
`vae.disc_weight`) with W the decoder's last convolution kernel. Both gradients are taken through that layer
alone (a vector–Jacobian product from the decoder's last features), not through the whole decoder again.
`disc_factor` is 0 before `vae.disc_start` steps and 1 after; it needs the step, which the trainer passes as
`batch['step']` (see `_disc_factor`).

The perceptual term is on when `vae.lpips_path` names LPIPS-VGG weights (`pretrained.lpips`; no package here ships
them). The network is part of the model, frozen: loaded as initial weights, left alone by the optimizer, and its
parameters are a constant inside the loss, so no gradient is computed for them.

Evaluation: PSNR and SSIM (`eval.image_metrics`) of posterior-mean reconstructions on the eval split and on
held-out scikit-image photos that no training set contains. Sampling writes original|reconstruction pairs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from diffusion_jax.config import ConfigError
from diffusion_jax.data import pipeline
from diffusion_jax.eval import image_metrics
from diffusion_jax.models import layers, remat
from diffusion_jax.models.lpips import LPIPS
from diffusion_jax.models.vae import AutoencoderKL, VAEConfig
from diffusion_jax.tasks.base import ModelContext, Task, register

REC_LOSSES = ("l1", "l2")
_MAX_ADAPTIVE_WEIGHT = 1e4  # taming's clamp: a vanishing GAN gradient must not blow the weight up


class PatchDiscriminator(nnx.Module):
  """PatchGAN (pix2pix; taming's `NLayerDiscriminator`): 4×4 convs, LeakyReLU(0.2), one logit per patch.

  GroupNorm replaces BatchNorm: the trainer keeps only parameters in its state (no running batch statistics),
  and a per-example norm also keeps real and fake batches from seeing each other's statistics.
  """

  def __init__(self, in_channels: int, channels: int = 64, num_layers: int = 3, norm_groups: int = 32, *,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)  # pix2pix/taming's conv init
    pad = ((1, 1), (1, 1))
    self.conv_in = layers.conv(in_channels, channels, 4, strides=2, padding=pad, rngs=rngs, kernel_init=init)
    convs, norms, prev = [], [], channels
    for n in range(1, num_layers + 1):
      width = channels * min(2 ** n, 8)
      stride = 2 if n < num_layers else 1  # the last hidden conv keeps the resolution, as in pix2pix
      convs.append(layers.conv(prev, width, 4, strides=stride, padding=pad, rngs=rngs, kernel_init=init))
      norms.append(layers.group_norm(width, norm_groups, rngs=rngs))
      prev = width
    self.convs, self.norms = nnx.List(convs), nnx.List(norms)
    self.conv_out = layers.conv(prev, 1, 4, padding=pad, rngs=rngs, kernel_init=init)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.leaky_relu(self.conv_in(x), 0.2)
    for conv, norm in zip(self.convs, self.norms):
      x = jax.nn.leaky_relu(norm(conv(x)), 0.2)
    return self.conv_out(x)


class AutoencoderWithDiscriminator(nnx.Module):
  """The VAE and (optionally) its discriminator as one model, so one optimizer trains both (module docstring)."""

  def __init__(self, vae_cfg: VAEConfig, disc: dict | None, *, rngs: nnx.Rngs, perceptual: bool = False):
    self.vae = AutoencoderKL(vae_cfg, rngs=rngs)
    self.discriminator = PatchDiscriminator(vae_cfg.out_channels, **disc, rngs=rngs) if disc else None
    self.lpips = LPIPS(rngs=rngs) if perceptual else None


def frozen_copy(module: nnx.Module) -> nnx.Module:
  """`module` with its parameters behind `stop_gradient`: a fixed function inside a loss."""
  graphdef, params = nnx.split(module)
  return nnx.merge(graphdef, jax.lax.stop_gradient(params))


def decode_with_features(vae: AutoencoderKL, z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`vae.decode(z)` and the input of the decoder's last conv, which the adaptive GAN weight differentiates at.

  Mirrors `AutoencoderKL.decode` / `Decoder.__call__` step for step (a test checks they stay equal).
  """
  if vae.post_quant_conv is not None:
    z = vae.post_quant_conv(z)
  dec = vae.decoder
  x = dec.mid_block(dec.conv_in(z))
  for block in dec.up_blocks:
    x = block(x)
  features = jax.nn.silu(dec.conv_norm_out(x))
  return dec.conv_out(features), features


def _weighted_mean(per_example: jax.Array, valid: jax.Array) -> jax.Array:
  return jnp.sum(per_example * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def _per_example_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim)))


def reconstruction_loss(kind: str, x: jax.Array, rec: jax.Array, valid: jax.Array) -> jax.Array:
  diff = x.astype(jnp.float32) - rec.astype(jnp.float32)
  err = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
  return _weighted_mean(_per_example_mean(err), valid)


def last_layer_grad_norm(conv: nnx.Conv, features: jax.Array, d_output: jax.Array) -> jax.Array:
  """‖∂L/∂kernel‖ of `conv` given its input `features` and ∂L/∂(its output), by one vector–Jacobian product."""
  kernel = jax.lax.stop_gradient(conv.kernel[...]).astype(jnp.float32)
  features = jax.lax.stop_gradient(features).astype(jnp.float32)

  strides = (conv.strides,) * 2 if isinstance(conv.strides, int) else tuple(conv.strides)

  def apply(w):
    return jax.lax.conv_general_dilated(features, w, strides, conv.padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  _, pullback = jax.vjp(apply, kernel)
  (grad,) = pullback(d_output.astype(jnp.float32))
  return jnp.sqrt(jnp.sum(jnp.square(grad)))


@register("autoencoder")
class AutoencoderTask(Task):

  def __init__(self, config):
    super().__init__(config)
    v, d = config.vae, config.data
    if v.rec_loss not in REC_LOSSES:
      raise ConfigError(f"vae.rec_loss must be one of {REC_LOSSES}, got {v.rec_loss!r}")
    self.perceptual = bool(v.get("lpips_path", ""))
    if self.perceptual and d.channels not in (1, 3):
      raise ConfigError(f"the perceptual loss compares grey or RGB images, but data.channels={d.channels}")
    if v.disc_weight < 0 or v.kl_weight < 0:
      raise ConfigError("vae.disc_weight and vae.kl_weight must be >= 0")
    self._pretrained = None
    if config.model.init_from:
      from diffusion_jax import pretrained
      self._pretrained = pretrained.load(config.model.init_from, allow_pickle=bool(config.model.allow_pickle))
      if not isinstance(self._pretrained, AutoencoderKL):
        raise ConfigError(f"model.init_from={config.model.init_from!r} holds a "
                          f"{type(self._pretrained).__name__}, not an AutoencoderKL")
      # Remat changes how blocks run, not what they hold: the checkpoint's weights load under any policy.
      self.vae_config = dataclasses.replace(self._pretrained.config, remat=remat.from_config(config.model))
    else:
      self.vae_config = vae_config(config)
    if self.vae_config.in_channels != d.channels:
      raise ConfigError(f"the VAE takes {self.vae_config.in_channels} channels but data.channels={d.channels}")
    if d.image_size % self.vae_config.downsample_factor:
      raise ConfigError(f"data.image_size={d.image_size} is not a multiple of the VAE's downsampling factor "
                        f"{self.vae_config.downsample_factor}")
    self.disc = None
    if v.disc_weight > 0:
      if v.disc_layers < 1:
        raise ConfigError(f"vae.disc_layers must be >= 1, got {v.disc_layers}")
      if d.image_size < 2 ** (v.disc_layers + 2):
        raise ConfigError(f"data.image_size={d.image_size} is too small for a {v.disc_layers}-layer discriminator")
      self.disc = dict(channels=int(v.disc_channels), num_layers=int(v.disc_layers),
                       norm_groups=int(v.disc_norm_groups))
    self._photos = None

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return AutoencoderWithDiscriminator(self.vae_config, self.disc, rngs=rngs, perceptual=self.perceptual)

  def initial_weights(self):
    # The LPIPS weights are read only here, when a run starts: a resumed run (or a frozen VAE restored for latent
    # diffusion) takes them from its checkpoint and does not need the file any more.
    from diffusion_jax.pretrained import weights
    out = {}
    if self._pretrained is not None:
      out.update({f"vae.{k}": v for k, v in weights.model_arrays(self._pretrained).items()})
    if self.perceptual:
      from diffusion_jax.pretrained.lpips import load_lpips
      path = self.config.vae.lpips_path
      try:
        lpips = load_lpips(path, allow_pickle=bool(self.config.model.allow_pickle))
      except weights.WeightsError as e:
        raise ConfigError(f"vae.lpips_path: {e}") from None
      out.update({f"lpips.{k}": v for k, v in weights.model_arrays(lpips).items()})
    return out or None

  def frozen_parameters(self) -> tuple[str, ...]:
    return (r"lpips\.",) if self.perceptual else ()

  def _rec_loss(self, model, x, rec, valid) -> tuple[jax.Array, dict]:
    """The pixel error plus the weighted perceptual distance: what the adaptive GAN weight balances against."""
    v = self.config.vae
    pixel = reconstruction_loss(v.rec_loss, x, rec, valid)
    if model.lpips is None:
      return pixel, {}
    perceptual = _weighted_mean(frozen_copy(model.lpips)(x, rec), valid)
    return pixel + v.perceptual_weight * perceptual, {"pixel_loss": pixel, "perceptual": perceptual}

  # ------------------------------------------------------------------ training
  def _disc_factor(self, batch) -> jax.Array:
    """0 before `vae.disc_start` steps, 1 after; the step comes from the trainer as `batch['step']`."""
    start = int(self.config.vae.disc_start)
    if start <= 0:
      return jnp.ones((), jnp.float32)
    if "step" not in batch:
      raise ConfigError(f"vae.disc_start={start} needs the training step in batch['step'], which the trainer "
                        "passes; call the loss with it")
    return (jnp.asarray(batch["step"]) >= start).astype(jnp.float32)

  def loss(self, model, batch, rng):
    v = self.config.vae
    x = batch["image"]
    valid = batch["valid"].astype(jnp.float32)
    posterior = model.vae.encode(x)
    z = posterior.sample(rng) if v.sample_posterior else posterior.mode()
    rec, features = decode_with_features(model.vae, z)
    rec = rec.astype(jnp.float32)
    rec_loss, rec_metrics = self._rec_loss(model, x, rec, valid)
    kl = _weighted_mean(posterior.kl(), valid)
    loss = rec_loss + v.kl_weight * kl / np.prod(x.shape[1:])
    psnr = image_metrics.psnr(image_metrics.signed_to_unit(x), image_metrics.signed_to_unit(rec))
    metrics = {"rec_loss": rec_loss, "kl": kl, "psnr": _weighted_mean(psnr, valid),
               "posterior_std": jnp.mean(posterior.std), **rec_metrics}
    if model.discriminator is not None:
      gan, gan_metrics = self._gan_loss(model, x, rec, features, valid)
      loss = loss + self._disc_factor(batch) * gan
      metrics.update(gan_metrics, disc_factor=self._disc_factor(batch))
    return loss, metrics

  def _gan_loss(self, model, x, rec, features, valid) -> tuple[jax.Array, dict]:
    v = self.config.vae
    disc = model.discriminator
    frozen = frozen_copy(disc)  # D as a fixed function: moves only the VAE

    def gen_loss(images):
      return -_weighted_mean(_per_example_mean(frozen(images)), valid)

    g_loss = gen_loss(rec)
    # ∂loss/∂x̂ of both terms, then through the last conv only: see last_layer_grad_norm.
    rec_sg = jax.lax.stop_gradient(rec)
    conv = model.vae.decoder.conv_out
    rec_norm = last_layer_grad_norm(conv, features, jax.grad(
        lambda r: self._rec_loss(model, x, r, valid)[0])(rec_sg))
    gen_norm = last_layer_grad_norm(conv, features, jax.grad(gen_loss)(rec_sg))
    d_weight = jax.lax.stop_gradient(jnp.clip(rec_norm / (gen_norm + 1e-4), 0.0, _MAX_ADAPTIVE_WEIGHT)) * v.disc_weight

    logits_real = _per_example_mean(disc(x))
    logits_fake = _per_example_mean(disc(rec_sg))  # x̂ fixed: moves only D
    d_loss = 0.5 * (_weighted_mean(jax.nn.relu(1.0 - logits_real), valid)
                    + _weighted_mean(jax.nn.relu(1.0 + logits_fake), valid))
    metrics = {"g_loss": g_loss, "d_loss": d_loss, "d_weight": d_weight,
               "logits_real": _weighted_mean(logits_real, valid), "logits_fake": _weighted_mean(logits_fake, valid)}
    return d_weight * g_loss + d_loss, metrics

  # ------------------------------------------------------------------ evaluation
  def _measure_fn(self, ctx: ModelContext):
    """jit of images → (reconstructions, {per-image 'psnr', 'ssim' on [0, 1] pixels, and with the perceptual term
    'lpips'}) with the posterior mean."""

    def measure(model, images):
      rec, _ = model.vae(images)
      rec = rec.astype(jnp.float32)
      a, b = image_metrics.signed_to_unit(images), image_metrics.signed_to_unit(rec)
      scores = {"psnr": image_metrics.psnr(a, b), "ssim": image_metrics.ssim(a, b)}
      if model.lpips is not None:
        scores["lpips"] = model.lpips(images, rec)
      return rec, scores

    return ctx.jit_apply(measure)

  def _gather(self, x) -> np.ndarray:
    if jax.process_count() > 1:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))

  def _eval_split(self, ctx: ModelContext, measure, max_examples: int) -> dict[str, np.ndarray]:
    e, data = self.config.eval, self.config.data
    ds = pipeline.make_dataset(data, data.eval_split, global_batch_size=int(e.batch_size), seed=0,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               shuffle=False, repeat=False, drop_remainder=False)
    out = {}
    seen = 0
    for batch in ds:
      g = ctx.global_batch({"image": batch["image"], "valid": batch["valid"]})
      rec, scores = measure(g["image"])
      keep = self._gather(g["valid"]) > 0
      for key, value in dict(scores, image=g["image"], rec=rec).items():
        out.setdefault(key, []).append(self._gather(value)[keep])
      seen += int(keep.sum())
      if max_examples and seen >= max_examples:
        break
    return {k: np.concatenate(v)[: max_examples or None] for k, v in out.items()}

  def photos(self) -> np.ndarray | None:
    """The held-out photos at the data's size and channels (None when `eval.photos` is empty)."""
    e, d = self.config.eval, self.config.data
    if not e.photos:
      return None
    if self._photos is None:
      self._photos = image_metrics.reference_photos(tuple(e.photos), d.image_size, d.channels, int(e.photo_crops))
    return self._photos

  def _eval_photos(self, measure) -> dict[str, np.ndarray]:
    """Every process measures all photos (replicated input), in chunks of eval.batch_size so shapes repeat."""
    photos = self.photos()
    chunk = int(self.config.eval.batch_size)
    out = {}
    for start in range(0, len(photos), chunk):
      part = photos[start:start + chunk]
      n = len(part)
      if n < chunk:
        part = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
      rec, scores = measure(part)
      for key, value in dict(scores, image=part, rec=rec).items():
        out.setdefault(key, []).append(self._gather(value)[:n])
    return {k: np.concatenate(v) for k, v in out.items()}

  def evaluate(self, ctx: ModelContext) -> dict[str, float]:
    measure = self._measure_fn(ctx)
    split = self._eval_split(ctx, measure, int(self.config.eval.max_examples))
    scores = [k for k in split if k not in ("image", "rec")]
    metrics = {f"eval/{k}": float(np.mean(split[k])) for k in scores}
    metrics["eval/examples"] = float(len(split["psnr"]))
    if self.photos() is not None:
      photos = self._eval_photos(measure)
      metrics.update({f"eval/photos_{k}": float(np.mean(photos[k])) for k in scores})
      metrics["eval/photos_examples"] = float(len(photos["psnr"]))
    logging.info("autoencoder eval: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    """original|reconstruction pairs: `sample.num_images` eval images, then the held-out photos' full views."""
    from diffusion_jax.eval import image_io
    s = self.config.sample
    measure = self._measure_fn(ctx)
    split = self._eval_split(ctx, measure, int(s.num_images))
    sources = [("eval", split)]
    if self.photos() is not None:
      photos = self._eval_photos(measure)
      full = np.arange(0, len(photos["psnr"]), int(self.config.eval.photo_crops))  # crop 0 of each photo
      sources.append(("photo", {k: v[full] for k, v in photos.items()}))
    if not ctx.is_main_process:
      return {}
    images, prompts, extra = [], [], []
    for name, part in sources:
      for i in range(len(part["psnr"])):
        images += [part["image"][i], part["rec"][i]]
        prompts += ["original", "reconstruction"]
        record = {"source": name, "pair": len(extra) // 2, "psnr": float(part["psnr"][i]),
                  "ssim": float(part["ssim"][i])}
        extra += [record, record]
    written = image_io.save_samples(out_dir, np.clip(np.stack(images), -1.0, 1.0), prompts,
                                    grid_cols=2 * int(s.pairs_per_row), extra=extra)
    from PIL import Image
    written["grid_image"] = np.asarray(Image.open(written["grid"]).convert("RGB"))
    return written


def vae_config(config) -> VAEConfig:
  """The VAE the `model` section describes (diffusers `AutoencoderKL` fields)."""
  m, d = config.model, config.data
  dtype = None if m.compute_dtype in ("", "float32") else jnp.dtype(m.compute_dtype)
  return VAEConfig(in_channels=d.channels, out_channels=d.channels, block_out_channels=tuple(m.block_out_channels),
                   layers_per_block=int(m.layers_per_block), latent_channels=int(m.latent_channels),
                   norm_num_groups=int(m.norm_num_groups), mid_block_attention=bool(m.mid_block_attention),
                   dtype=dtype, attention_impl=m.attention_impl or None, remat=remat.from_config(m))
