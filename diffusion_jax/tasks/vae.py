"""A VAE as a generative model (`models.conv_vae`): trained on the negative ELBO, sampled from the prior N(0, I).

Loss per image, in nats: -log p(x|z) + β·KL(q(z|x) ‖ N(0, I)), one reparameterised z ~ q(z|x), the KL in closed
form; averaged over the batch and divided by the pixel count D so the gradient's scale does not grow with the image
(β = 1: the negative ELBO per dimension). Options (`vae.*`):
  likelihood   'bernoulli': the decoder gives a logit per pixel. With `binarize` each step draws a fresh binary image
               b ~ Bernoulli((x + 1) / 2) (dynamic binarization, the standard MNIST likelihood benchmark) and the
               encoder sees b; without, the grey level is a soft target (a cross-entropy, not a density of grey images).
               The `elbo` evaluator scores binarized test images either way.
               'gaussian': the decoder gives a mean per pixel; p(x|z) is the discretized Gaussian over the 256 8-bit
               levels (`models.likelihoods`), a true probability of 8-bit images, with σ fixed at `gaussian_std`
               (in [-1, 1] units) or, with `gaussian_std=0`, one learned σ per channel shared by every pixel.
  beta         the KL weight (β-VAE); the reported `neg_elbo` always uses β = 1.
  conditional  the label's one-hot enters encoder and decoder (a conditional VAE): samples are drawn per digit.
  input_noise  > 0: a denoising VAE: Gaussian noise of this std (in [-1, 1] units) corrupts what the encoder sees in
               training; the likelihood is of the clean image.
Sampling decodes z ~ N(0, I) to the decoder's mean: Bernoulli probabilities, or Gaussian means, mapped to [-1, 1].
The `elbo` evaluator (`evaluators.likelihood`) reports the negative ELBO and the importance-weighted bound on the test
split in nats per image and bits per dimension.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.config import ConfigError, compute_dtype
from diffusion_jax.data import pipeline
from diffusion_jax.eval import image_io
from diffusion_jax.gan.losses import weighted_mean
from diffusion_jax.models import likelihoods
from diffusion_jax.models.conv_vae import ConvVAE, ConvVAEConfig
from diffusion_jax.parallel import host
from diffusion_jax.train.evaluators import split_outputs
from diffusion_jax.train.task import ModelContext, Task, register

LIKELIHOODS = ("bernoulli", "gaussian")


@register("vae")
class VAETask(Task):

  def __init__(self, config):
    super().__init__(config)
    v, m, d = config.vae, config.model, config.data
    if v.likelihood not in LIKELIHOODS:
      raise ConfigError(f"vae.likelihood must be one of {LIKELIHOODS}, got {v.likelihood!r}")
    self.bernoulli = v.likelihood == "bernoulli"
    for key in ("beta", "input_noise", "gaussian_std"):
      if v[key] < 0:
        raise ConfigError(f"vae.{key} must be >= 0, got {v[key]}")
    if self.bernoulli and v.gaussian_std:
      raise ConfigError("vae.gaussian_std is the Gaussian decoder's σ, but vae.likelihood='bernoulli'")
    if not self.bernoulli and v.binarize:
      raise ConfigError("vae.binarize draws binary images for a Bernoulli decoder; a Gaussian decoder models the 8-bit "
                        "pixels: set vae.binarize=False")
    self.num_classes = len(d.class_names) if v.conditional else 0
    try:
      self.model_config = ConvVAEConfig(
          image_size=int(d.image_size), channels=int(d.channels), conv_widths=tuple(m.conv_widths),
          hidden=tuple(m.hidden), latent_dim=int(m.latent_dim), num_classes=self.num_classes,
          learned_scale=not self.bernoulli and not v.gaussian_std, dtype=compute_dtype(m.compute_dtype))
    except ValueError as e:
      raise ConfigError(f"model: {e}") from None
    self.dims = int(d.image_size) ** 2 * int(d.channels)  # D, for per-dimension losses and bits/dim

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return ConvVAE(self.model_config, rngs=rngs)

  # ------------------------------------------------------------------ the likelihood
  def _labels(self, batch) -> Optional[jax.Array]:
    return batch["label"] if self.num_classes else None

  def observe(self, images: jax.Array, rng: jax.Array, binarize: Optional[bool] = None
              ) -> tuple[jax.Array, jax.Array]:
    """(what the likelihood scores, what the encoder sees in [-1, 1]) of images in [-1, 1]. A Bernoulli model's
    target is, when binarizing (default `vae.binarize`), a binary draw from the pixel intensities, which the encoder
    sees too; otherwise the intensities in [0, 1] as soft targets."""
    if not self.bernoulli:
      return images, images
    p = (images.astype(jnp.float32) + 1.0) / 2.0
    if not (self.config.vae.binarize if binarize is None else binarize):
      return p, images
    b = jax.random.bernoulli(rng, p).astype(jnp.float32)
    return b, 2.0 * b - 1.0

  def log_scale(self, model) -> jax.Array:
    """log σ of the Gaussian decoder, per channel."""
    if model.log_scale is not None:
      return model.log_scale[...]
    return jnp.full((self.model_config.channels,), math.log(float(self.config.vae.gaussian_std)), jnp.float32)

  def log_likelihood(self, model, target: jax.Array, outputs: jax.Array) -> jax.Array:
    """log p(x|z) per image (summed over pixels), of the decoder's `outputs` for `target` from `observe`."""
    if self.bernoulli:
      return likelihoods.bernoulli_log_prob(target, outputs)
    return likelihoods.discretized_gaussian_log_prob(target, outputs, self.log_scale(model))

  def mean_image(self, outputs: jax.Array) -> jax.Array:
    """The decoder's mean in [-1, 1]: Bernoulli probabilities, or Gaussian means clipped to the pixel range."""
    if self.bernoulli:
      return 2.0 * jax.nn.sigmoid(outputs) - 1.0
    return jnp.clip(outputs, -1.0, 1.0)

  # ------------------------------------------------------------------ training
  def loss(self, model, batch, rng):
    rng_data, rng_noise, rng_z = jax.random.split(rng, 3)
    valid = batch["valid"].astype(jnp.float32)
    labels = self._labels(batch)
    target, seen = self.observe(batch["image"], rng_data)
    noise = float(self.config.vae.input_noise)
    if noise:  # denoising: only the encoder's view is corrupted; the likelihood stays that of the clean image
      seen = seen + noise * jax.random.normal(rng_noise, seen.shape, seen.dtype)
    posterior = model.encode(seen, labels)
    rec = -self.log_likelihood(model, target, model.decode(posterior.sample(rng_z), labels))
    kl = posterior.kl()
    loss = weighted_mean(rec + float(self.config.vae.beta) * kl, valid) / self.dims
    neg_elbo = weighted_mean(rec + kl, valid)
    metrics = {"neg_elbo": neg_elbo, "bits_per_dim": likelihoods.bits_per_dim(neg_elbo, self.dims),
               "reconstruction": weighted_mean(rec, valid), "kl": weighted_mean(kl, valid),
               "count/skipped_examples": jnp.sum(1.0 - valid)}
    if not self.bernoulli:
      metrics["decoder_std"] = jnp.mean(jnp.exp(self.log_scale(model)))
    return loss, metrics

  # ------------------------------------------------------------------ evaluation
  def bounds(self, model, batch, index: jax.Array, seed: jax.Array, samples: int) -> dict[str, jax.Array]:
    """Per image, in nats: 'reconstruction' E_q[-log p(x|z)] (the mean over the samples), 'kl' (closed form),
    'neg_elbo' their sum, 'iwae_nll' minus the `samples`-sample importance-weighted bound, all with q(z|x) of the clean
    image as proposal.

    A Bernoulli model scores binary images (binarized here whatever `vae.binarize` trained on: a proper likelihood),
    with q(z|b) of the binary image b. Randomness is keyed by each image's `index` in the split and `seed`, not by
    the batch: the binarization (drawn once per seed, so every evaluation scores the same binary images) and the
    draws of z are the same whatever the batch size.
    """
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(jax.random.key(seed), i)))(index)
    labels = self._labels(batch)
    target, seen = jax.vmap(lambda x, k: self.observe(x, k, binarize=True))(batch["image"], keys[:, 0])
    posterior = model.encode(seen, labels)
    eps = jax.vmap(lambda k: jax.random.normal(k, (samples, self.model_config.latent_dim)))(keys[:, 1])
    z = posterior.mean + posterior.std * jnp.swapaxes(eps, 0, 1)  # [K, B, latent]
    # One decoder batch per few samples: K · B images at once would not fit for K = 100.
    log_px = jax.lax.map(lambda zk: self.log_likelihood(model, target, model.decode(zk, labels)), z,
                         batch_size=min(samples, 10))
    log_w = log_px + likelihoods.standard_normal_log_prob(z) - posterior.log_prob(z)
    rec, kl = -jnp.mean(log_px, axis=0), posterior.kl()
    return {"reconstruction": rec, "kl": kl, "neg_elbo": rec + kl,
            "iwae_nll": -likelihoods.importance_weighted_bound(log_w)}

  # ------------------------------------------------------------------ sampling
  def label_prompts(self, per_class: int, template: str = "") -> tuple[list[str], np.ndarray]:
    return pipeline.label_prompts(self.config.data, per_class, template)

  def _generate_fn(self, num_images: int):
    latent = self.model_config.latent_dim

    def generate(model, labels, rng):
      z = jax.random.normal(rng, (num_images, latent), jnp.float32)
      return self.mean_image(model.decode(z, labels if self.num_classes else None))

    return generate

  def generate(self, ctx: ModelContext, prompts: Sequence[str], seed: int, *, labels=None,
               guidance_scale=None) -> np.ndarray:
    """Decoder means in [-1, 1] of z ~ N(0, I), one per prompt (the prompts only count the images; a conditional
    VAE draws digit `labels[i]`), in fixed-size chunks so one program is compiled; the same `seed` gives the same
    images."""
    if guidance_scale is not None:
      raise ConfigError(f"a VAE samples in one decoder pass, without guidance; got guidance_scale={guidance_scale}")
    if self.num_classes and labels is None:
      raise ValueError("a conditional VAE draws images of given labels; pass labels=")
    labels = np.zeros(len(prompts), np.int32) if labels is None else np.asarray(labels, np.int32)
    if labels.shape != (len(prompts),):
      raise ValueError(f"got {len(prompts)} prompts but labels of shape {labels.shape}")
    chunk = min(int(self.config.sample.batch_size), len(prompts))
    fn = ctx.jit(self._generate_fn(chunk), key=(self, "generate", chunk))
    return host.run_chunked(fn, labels, chunk, extra=lambda i: (jax.random.fold_in(jax.random.key(seed), i),))

  def reconstruct(self, model, batch, seed) -> dict[str, jax.Array]:
    """What the encoder sees (binarized with `seed` for a binarizing Bernoulli model) and the decoder mean of its
    posterior mean, both in [-1, 1]."""
    labels = self._labels(batch)
    _, seen = self.observe(batch["image"], jax.random.key(seed))
    return {"image": seen, "rec": self.mean_image(model.decode(model.encode(seen, labels).mean, labels))}

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    """A grid of prior samples, `sample.per_class` per row: one row per digit for a conditional VAE, as many rows of
    unconditional draws otherwise; then `sample.pairs` original|reconstruction pairs of eval images in the same
    rows."""
    s, d = self.config.sample, self.config.data
    per_class = int(s.per_class)
    if self.num_classes:
      prompts, labels = self.label_prompts(per_class)
    else:
      prompts, labels = ["prior sample"] * (per_class * len(d.class_names)), None
    images = self.generate(ctx, prompts, int(s.seed), labels=labels)
    fn = ctx.jit(self.reconstruct)
    pairs = split_outputs(ctx, d, d.eval_split, int(s.batch_size), lambda batch: dict(fn(batch, int(s.seed)),
                                                                                        label=batch["label"]),
                          max_examples=int(s.pairs))
    if not ctx.is_main_process:
      return {}
    prompts = list(prompts)
    extra = ([{"kind": "prior", "label": int(l)} for l in labels] if labels is not None
             else [{"kind": "prior"} for _ in prompts])
    shown = [images]
    for i in range(len(pairs["rec"])):
      shown += [pairs["image"][i:i + 1], pairs["rec"][i:i + 1]]
      prompts += ["original", "reconstruction"]
      extra += [{"kind": kind, "pair": i, "label": int(pairs["label"][i])} for kind in ("original", "reconstruction")]
    return image_io.save_samples(out_dir, np.concatenate(shown), prompts, grid_cols=per_class, extra=extra)
