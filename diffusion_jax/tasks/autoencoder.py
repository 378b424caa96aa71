"""KL autoencoder training (the first stage of latent diffusion), or VQ-VAE / VQGAN training (`vae.bottleneck='vq'`,
DALL-E-style image tokens), with an optional PatchGAN discriminator trained as a second update with its own
optimizer, as taming-transformers does.

Update 'vae' (optimizer `optim`), as in LDM's `LPIPSWithDiscriminator`:
  rec_loss + perceptual_weight · LPIPS(x, x̂) + kl_weight · KL / (H·W·C) + disc_factor · d_weight · g_loss
rec_loss is the per-pixel mean |x - x̂| (or squared error). LDM sums the reconstruction error over pixels and adds
kl_weight · KL; dividing both by the pixel count keeps gradients O(1) for the optimizer's clipping while keeping
LDM's balance, so its kl_weight (1e-6) means the same here. g_loss = -D(x̂): the discriminator's parameters belong
to the other update, so this one moves the VAE only.
With `vae.bottleneck='vq'` (`models.vq.VQModel`) the KL term is replaced by VQ-VAE's codebook loss ‖sg[z] − e‖² plus
`vae.vq.beta` · the commitment loss ‖z − sg[e]‖² on the straight-through quantised latents; with `vae.vq.ema_decay` > 0
the codebook is an exponential moving average of the encoder outputs assigned to each code (mutable state, updated
by this update only; no codebook loss), and codes whose average use falls below `vae.vq.restart_threshold` restart at
a random encoder output of the batch. With `vae.bottleneck='gumbel'` it is DALL-E's discrete VAE: the decoder reads the
Gumbel-softmax relaxation of the encoder's logits over the codes at temperature τ, annealed exponentially from
`vae.gumbel.tau_start` to `tau_end` over `anneal_steps`, and the loss adds β · KL(q ‖ uniform) / (H·W·C), β rising
linearly to `vae.gumbel.kl_weight` over `kl_warmup_steps` (the trainer passes the step as `batch['step']`); inference
takes the most likely code. The `codebook` evaluator reports usage and perplexity of the codes.
d_weight is taming's adaptive weight, ‖∇_W rec_loss‖ / ‖∇_W g_loss‖ (clipped to [0, 1e4], times
`vae.disc_weight`) with W the decoder's last convolution kernel; both gradients are taken through that layer alone
(one vector–Jacobian product from the decoder's last features).

Update 'discriminator' (optimizer `disc_optim`; only with `vae.disc_weight > 0`): the hinge loss
disc_factor · ½ (relu(1 - D(x)) + relu(1 + D(x̂))) on reconstructions by the VAE as the first update left it.
disc_factor is 0 before `vae.disc_start` steps and 1 after (the trainer passes the step as `batch['step']`).

The perceptual term is on when `vae.lpips_path` names LPIPS-VGG weights (`pretrained.lpips`); the network is a frozen
part of the model, read from that file at every start. Evaluation: the `reconstruction` and `photos` evaluators
(PSNR, SSIM, LPIPS of posterior-mean reconstructions). Sampling writes original|reconstruction pairs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.config import ConfigError, compute_dtype
from diffusion_jax.eval import image_io, image_metrics
from diffusion_jax.gan import losses as gan_losses
from diffusion_jax.gan.losses import weighted_mean
from diffusion_jax.models import remat
from diffusion_jax.models.discriminator import PatchDiscriminator
from diffusion_jax.models.lpips import LPIPS
from diffusion_jax.models.vae import AutoencoderKL, VAEConfig
from diffusion_jax.models.vq import VQConfig, VQModel
from diffusion_jax.train import parts, runs
from diffusion_jax.train.evaluators import split_outputs
from diffusion_jax.train.task import ModelContext, Task, register

REC_LOSSES = ("l1", "l2")
BOTTLENECKS = ("kl", "vq", "gumbel")
_MAX_ADAPTIVE_WEIGHT = 1e4  # taming's clamp: a vanishing GAN gradient must not blow the weight up


class AutoencoderWithDiscriminator(nnx.Module):
  """The VAE, its optional discriminator and the optional frozen perceptual network."""

  def __init__(self, vae_cfg: VAEConfig, disc: dict | None, *, rngs: nnx.Rngs, perceptual: bool = False):
    self.vae = VQModel(vae_cfg, rngs=rngs) if isinstance(vae_cfg, VQConfig) else AutoencoderKL(vae_cfg, rngs=rngs)
    self.discriminator = PatchDiscriminator(vae_cfg.out_channels, **disc, rngs=rngs) if disc else None
    self.lpips = LPIPS(rngs=rngs) if perceptual else None


def _per_example_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim)))


def reconstruction_loss(kind: str, x: jax.Array, rec: jax.Array, valid: jax.Array) -> jax.Array:
  diff = x.astype(jnp.float32) - rec.astype(jnp.float32)
  err = jnp.abs(diff) if kind == "l1" else jnp.square(diff)
  return weighted_mean(_per_example_mean(err), valid)


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


def bottleneck(config) -> str:
  return config.vae.get("bottleneck", "kl")  # runs saved before VQ existed are KL autoencoders


def vae_config(config) -> VAEConfig:
  """The autoencoder the `model` section describes (diffusers `AutoencoderKL` fields; a `VQModel` with
  `vae.bottleneck='vq'` or `'gumbel'`, its codebook from `vae.vq`)."""
  m, d = config.model, config.data
  fields = dict(in_channels=d.channels, out_channels=d.channels, block_out_channels=tuple(m.block_out_channels),
                layers_per_block=int(m.layers_per_block), latent_channels=int(m.latent_channels),
                norm_num_groups=int(m.norm_num_groups), mid_block_attention=bool(m.mid_block_attention),
                dtype=compute_dtype(m.compute_dtype), attention_impl=m.attention_impl or None,
                remat=remat.from_config(m))
  if bottleneck(config) == "kl":
    return VAEConfig(**fields)
  q, gumbel = config.vae.vq, bottleneck(config) == "gumbel"
  return VQConfig(**fields, num_vq_embeddings=int(q.codebook_size), vq_embed_dim=int(q.dim) or None,
                  beta=float(q.beta), gumbel=gumbel, ema_decay=0.0 if gumbel else float(q.ema_decay),
                  restart_threshold=0.0 if gumbel else float(q.restart_threshold))


@register("autoencoder")
class AutoencoderTask(Task):

  def __init__(self, config):
    super().__init__(config)
    v, d, m = config.vae, config.data, config.model
    if v.rec_loss not in REC_LOSSES:
      raise ConfigError(f"vae.rec_loss must be one of {REC_LOSSES}, got {v.rec_loss!r}")
    self.bottleneck = bottleneck(config)
    if self.bottleneck not in BOTTLENECKS:
      raise ConfigError(f"vae.bottleneck must be one of {BOTTLENECKS}, got {self.bottleneck!r}")
    if self.bottleneck == "gumbel":
      if "gumbel" not in v:
        raise ConfigError("vae.bottleneck='gumbel' needs a vae.gumbel section (tau_start, tau_end, anneal_steps, "
                          "kl_weight, kl_warmup_steps); see configs/mnist_vq.py:dvae")
      g = v.gumbel
      if not 0 < g.tau_end <= g.tau_start or g.anneal_steps < 0 or g.kl_weight < 0 or g.kl_warmup_steps < 0:
        raise ConfigError(f"vae.gumbel: need 0 < tau_end <= tau_start, anneal_steps >= 0, kl_weight >= 0 and "
                          f"kl_warmup_steps >= 0; got {dict(g)}")
    if self.bottleneck != "kl":
      if "vq" not in v:
        raise ConfigError("vae.bottleneck='vq' needs a vae.vq section (codebook_size, dim, beta, ema_decay, "
                          "restart_threshold); see configs/mnist_vq.py")
      if not 0 <= v.vq.ema_decay < 1 or v.vq.codebook_size < 2 or v.vq.restart_threshold < 0:
        raise ConfigError(f"vae.vq: ema_decay must be in [0, 1), codebook_size >= 2 and restart_threshold >= 0, got "
                          f"{v.vq.ema_decay}, {v.vq.codebook_size}, {v.vq.restart_threshold}")
    self.perceptual = bool(v.lpips_path)
    if self.perceptual and d.channels not in (1, 3):
      raise ConfigError(f"the perceptual loss compares grey or RGB images, but data.channels={d.channels}")
    if v.disc_weight < 0 or v.kl_weight < 0:
      raise ConfigError("vae.disc_weight and vae.kl_weight must be >= 0")
    self.init_source = None
    if m.init_from:
      from diffusion_jax import pretrained
      self.init_source = runs.ModuleSource(
          "model.init_from", m.init_from, lambda p: pretrained.load(p, allow_pickle=bool(m.allow_pickle)),
          target="vae", expect=AutoencoderKL if self.bottleneck == "kl" else VQModel)
      # Remat changes how blocks run, not what they hold: the checkpoint's weights load under any policy.
      self.vae_config = dataclasses.replace(self.init_source.module().config, remat=remat.from_config(m))
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

  def updates(self):
    vae = parts.Update("vae", self.vae_loss, params=parts.under("vae"))
    if self.disc is None:
      return (vae,)
    return (vae, parts.Update("discriminator", self.discriminator_loss, params=parts.under("discriminator"),
                              optimizer="disc_optim"))

  def frozen(self):
    return parts.under("lpips")

  def weight_sources(self):
    sources = [self.init_source] if self.init_source is not None else []
    if self.perceptual:
      from diffusion_jax.pretrained.lpips import load_lpips
      allow = bool(self.config.model.allow_pickle)
      sources.append(runs.ModuleSource("vae.lpips_path", self.config.vae.lpips_path,
                                       lambda p: load_lpips(p, allow_pickle=allow), target="lpips", frozen=True))
    return sources

  # ------------------------------------------------------------------ training
  def _rec_loss(self, model, x, rec, valid) -> tuple[jax.Array, dict]:
    """The pixel error plus the weighted perceptual distance: what the adaptive GAN weight balances against."""
    v = self.config.vae
    pixel = reconstruction_loss(v.rec_loss, x, rec, valid)
    if model.lpips is None:
      return pixel, {}
    perceptual = weighted_mean(model.lpips(x, rec), valid)
    return pixel + v.perceptual_weight * perceptual, {"pixel_loss": pixel, "perceptual": perceptual}

  def _disc_factor(self, batch) -> jax.Array:
    """0 before `vae.disc_start` steps, 1 after; the step comes from the trainer as `batch['step']`."""
    start = int(self.config.vae.disc_start)
    if start <= 0:
      return jnp.ones((), jnp.float32)
    if "step" not in batch:
      raise ConfigError(f"vae.disc_start={start} needs the training step in batch['step'], which the trainer "
                        "passes; call the loss with it")
    return (jnp.asarray(batch["step"]) >= start).astype(jnp.float32)

  def _gumbel_schedule(self, step) -> tuple[jax.Array, jax.Array]:
    """(temperature τ, KL weight β) at training `step` (None: the end of both schedules)."""
    g = self.config.vae.gumbel
    if step is None:
      return jnp.float32(g.tau_end), jnp.float32(g.kl_weight)
    step = jnp.asarray(step, jnp.float32)
    done = jnp.clip(step / max(int(g.anneal_steps), 1), 0.0, 1.0)
    tau = g.tau_start * (g.tau_end / g.tau_start) ** done
    beta = g.kl_weight * jnp.clip(step / max(int(g.kl_warmup_steps), 1), 0.0, 1.0)
    return tau.astype(jnp.float32), beta.astype(jnp.float32)

  def _reconstruct(self, model, x, rng, valid=None, update_codebook=False, batch_step=None):
    """(the posterior, or the VQ terms {indices, codebook_loss, commitment, restarted} or the dVAE's {indices, kl};
    reconstruction; the decoder's last features). `update_codebook`: take the EMA codebook's step (the 'vae' update
    only); `batch_step`: the training step the dVAE's temperature follows."""
    if self.bottleneck == "gumbel":
      logits = model.vae.encode(x)
      relaxed, kl = model.vae.relaxed(logits, rng, self._gumbel_schedule(batch_step)[0])
      rec, features = model.vae.decode_with_features(relaxed.astype(logits.dtype))
      return {"indices": model.vae.codes(logits), "kl": kl}, rec.astype(jnp.float32), features
    if self.bottleneck == "vq":
      z = model.vae.encode(x)
      quantized, indices, codebook_loss, commitment = model.vae.quantize.straight_through(z, valid)
      aux = {"indices": indices, "codebook_loss": codebook_loss, "commitment": commitment}
      if update_codebook and model.vae.quantize.ema_decay > 0:
        aux.update(model.vae.quantize.update_ema(z, indices, rng, valid))
      rec, features = model.vae.decode_with_features(quantized)
      return aux, rec.astype(jnp.float32), features
    posterior = model.vae.encode(x)
    z = posterior.sample(rng) if self.config.vae.sample_posterior else posterior.mode()
    rec, features = model.vae.decode_with_features(z)
    return posterior, rec.astype(jnp.float32), features

  def _bottleneck_loss(self, aux, x, valid, step=None) -> tuple[jax.Array, dict]:
    v = self.config.vae
    if self.bottleneck == "kl":
      kl = weighted_mean(aux.kl(), valid)
      return v.kl_weight * kl / np.prod(x.shape[1:]), {"kl": kl, "posterior_std": jnp.mean(aux.std)}
    metrics = self._code_metrics(aux["indices"], valid)
    if self.bottleneck == "gumbel":
      tau, beta = self._gumbel_schedule(step)
      kl = weighted_mean(aux["kl"], valid)
      return beta * kl / np.prod(x.shape[1:]), {"kl": kl, "temperature": tau, "kl_weight": beta, **metrics}
    metrics.update(codebook_loss=aux["codebook_loss"], commitment=aux["commitment"])
    if "restarted" in aux:
      metrics["count/restarted_codes"] = aux["restarted"]
    return aux["codebook_loss"] + v.vq.beta * aux["commitment"], metrics

  def _code_metrics(self, indices, valid) -> dict:
    """The batch's code histogram: its perplexity and the codes used."""
    v = self.config.vae
    counts = jax.ops.segment_sum(jnp.broadcast_to(valid.reshape((-1,) + (1,) * (indices.ndim - 1)),
                                                  indices.shape).reshape(-1),
                                 indices.reshape(-1), int(v.vq.codebook_size))
    p = counts / jnp.maximum(jnp.sum(counts), 1.0)
    return {"batch_perplexity": jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0))),
            "batch_codes_used": jnp.sum((counts > 0).astype(jnp.float32))}

  def vae_loss(self, model, batch, rng):
    v = self.config.vae
    x = batch["image"]
    valid = batch["valid"].astype(jnp.float32)
    step = batch.get("step")
    aux, rec, features = self._reconstruct(model, x, rng, valid, update_codebook=True, batch_step=step)
    rec_loss, rec_metrics = self._rec_loss(model, x, rec, valid)
    bottleneck_loss, bottleneck_metrics = self._bottleneck_loss(aux, x, valid, step)
    loss = rec_loss + bottleneck_loss
    psnr = image_metrics.psnr(image_metrics.signed_to_unit(x), image_metrics.signed_to_unit(rec))
    metrics = {"rec_loss": rec_loss, "psnr": weighted_mean(psnr, valid), **bottleneck_metrics,
               "count/skipped_examples": jnp.sum(1.0 - valid), **rec_metrics}
    if model.discriminator is not None:
      factor = self._disc_factor(batch)
      gen_loss = lambda images: -weighted_mean(_per_example_mean(model.discriminator(images)), valid)
      g_loss = gen_loss(rec)
      # ∂loss/∂x̂ of both terms, then through the last conv only: see last_layer_grad_norm.
      rec_sg = jax.lax.stop_gradient(rec)
      conv = model.vae.decoder.conv_out
      rec_norm = last_layer_grad_norm(conv, features, jax.grad(lambda r: self._rec_loss(model, x, r, valid)[0])(rec_sg))
      gen_norm = last_layer_grad_norm(conv, features, jax.grad(gen_loss)(rec_sg))
      d_weight = jax.lax.stop_gradient(jnp.clip(rec_norm / (gen_norm + 1e-4), 0.0, _MAX_ADAPTIVE_WEIGHT))
      d_weight = d_weight * v.disc_weight
      loss = loss + factor * d_weight * g_loss
      metrics.update(g_loss=g_loss, d_weight=d_weight, disc_factor=factor)
    return loss, metrics

  def discriminator_loss(self, model, batch, rng):
    x = batch["image"]
    valid = batch["valid"].astype(jnp.float32)
    _, rec, _ = self._reconstruct(model, x, rng, valid, batch_step=batch.get("step"))
    logits_real = _per_example_mean(model.discriminator(x))
    logits_fake = _per_example_mean(model.discriminator(rec))
    d_loss = 0.5 * (gan_losses.real_term("hinge", logits_real, valid)
                    + gan_losses.fake_term("hinge", logits_fake, valid))
    factor = self._disc_factor(batch)
    metrics = {"d_loss": d_loss, "logits_real": weighted_mean(logits_real, valid),
               "logits_fake": weighted_mean(logits_fake, valid)}
    return factor * d_loss, metrics

  # ------------------------------------------------------------------ evaluation and sampling
  def measure(self, model, images):
    """(reconstructions, {per-image 'psnr', 'ssim' on [0, 1] pixels, with the perceptual network 'lpips'}) with the
    posterior mean."""
    rec, _ = model.vae(images)
    rec = rec.astype(jnp.float32)
    a, b = image_metrics.signed_to_unit(images), image_metrics.signed_to_unit(rec)
    scores = {"psnr": image_metrics.psnr(a, b), "ssim": image_metrics.ssim(a, b)}
    if model.lpips is not None:
      scores["lpips"] = model.lpips(images, rec)
    return rec, scores

  def heldout_outputs(self, ctx: ModelContext, images: np.ndarray, seed: int) -> np.ndarray:
    """Posterior-mean reconstructions of images [N, H, W, C] in [-1, 1] (what `fid` with source='heldout' compares
    with them: rFID); `seed` is unused, the posterior mean being deterministic."""
    del seed
    from diffusion_jax.parallel import host
    fn = ctx.jit(lambda model, x: model.vae(x)[0].astype(jnp.float32), key=(self, "reconstruct"))
    images = np.asarray(images, np.float32)
    return host.run_chunked(fn, images, min(int(self.config.sample.batch_size), len(images)))

  def measure_split(self, ctx: ModelContext, split: str, batch_size: int, max_examples: int
                    ) -> dict[str, np.ndarray]:
    """Images, reconstructions and scores over a split."""
    fn = ctx.jit(self.measure)

    def one(batch):
      rec, scores = fn(batch["image"])
      return dict(scores, image=batch["image"], rec=rec)

    return split_outputs(ctx, self.config.data, split, batch_size, one,
                         max_examples=max_examples)

  def photos(self, crops: int, names=None) -> np.ndarray | None:
    """The held-out photos at the data's size and channels (None when none are named)."""
    d = self.config.data
    names = tuple(names) if names is not None else tuple(self.config.sample.photos)
    if not names:
      return None
    key = (names, crops)
    if self._photos is None or self._photos[0] != key:
      self._photos = key, image_metrics.reference_photos(names, d.image_size, d.channels, crops)
    return self._photos[1]

  def measure_photos(self, ctx: ModelContext, photos: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Every process measures all photos (replicated input), in fixed-size chunks so shapes repeat."""
    from diffusion_jax.parallel import host
    fn = ctx.jit(self.measure)

    def one(images):
      rec, scores = fn(images)
      return dict(scores, image=images, rec=rec)

    return host.run_chunked(one, photos, batch_size)

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    """original|reconstruction pairs: `sample.num_images` eval images, then the held-out photos' full views."""
    s = self.config.sample
    data = self.config.data
    sources = [("eval", self.measure_split(ctx, data.eval_split, int(s.batch_size), int(s.num_images)))]
    photos = self.photos(int(s.photo_crops))
    if photos is not None:
      measured = self.measure_photos(ctx, photos, int(s.batch_size))
      full = np.arange(0, len(photos), int(s.photo_crops))  # crop 0 of each photo
      sources.append(("photo", {k: v[full] for k, v in measured.items()}))
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
    return image_io.save_samples(out_dir, np.clip(np.stack(images), -1.0, 1.0), prompts,
                                 grid_cols=2 * int(s.pairs_per_row), extra=extra)
