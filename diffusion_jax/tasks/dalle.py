"""DALL-E 1 (Ramesh et al. 2021) on the trainer: a transformer over a caption's tokens and a frozen VQ tokenizer's image
codes (`models.dalle`), sampled through the shared KV-cache sampler and reranked by a CLIP run.

The tokenizer is a finished VQ autoencoder run (`dalle.vq_workdir`: task='autoencoder', vae.bottleneck='vq', e.g.
configs/mnist_vq.py), restored frozen under `vae`; each training batch's images are tokenized inside the step. The
loss is the paper's weighted sum of the caption's next-token cross-entropy (padding excluded) and the image codes'
(`dalle.text_loss_weight`, 1/8 in the paper, the image the rest); for `dalle.cond_drop_prob` of the rows the caption is
replaced by the empty one, so that sampling can guide the logits away from it (`sample.guidance_scale`; 1 = none).

Sampling: `sample.temperature`, `sample.top_k`, `sample.top_p`; `sample.candidates` images per caption, of which the
one a CLIP run (`dalle.clip_workdir`, its towers restored frozen under `reranker`, not recorded) scores highest
against the caption is kept, as DALL-E reranks 512 → 1. `generate(..., candidates=1)` draws without reranking.
`generate(..., images=, rows_given=R)` keeps the first R rows of each image's codes and draws the rest (completion;
`--mode sample --config.sample.complete_rows=R` writes held-out emoji or digits completed so).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from diffusion_jax.config import ConfigError, compute_dtype
from diffusion_jax.data import pipeline, tokenizers
from diffusion_jax.eval import image_io
from diffusion_jax.models.dalle import Dalle, DalleConfig
from diffusion_jax.models.decoder import DecoderConfig
from diffusion_jax.models.vq import VQConfig, VQModel
from diffusion_jax.parallel import host
from diffusion_jax.tasks import clip_towers
from diffusion_jax.train import parts, runs
from diffusion_jax.train.evaluators import images_and_captions
from diffusion_jax.train.task import ModelContext, Task, register


class DalleModel(nnx.Module):
  """The frozen tokenizer (`vae`, the VQ run's own name), the transformer and, with a reranking CLIP, its towers."""

  def __init__(self, vq: VQConfig, transformer: DalleConfig, clip: clip_towers.FrozenClip | None, *,
               rngs: nnx.Rngs):
    self.vae = VQModel(vq, rngs=rngs)
    self.transformer = Dalle(transformer, rngs=rngs)
    self.reranker = clip.build(rngs) if clip is not None else None


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-position −log p(target) [B, T] of logits [B, T, V] (float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


@register("dalle")
class DalleTask(Task):

  def __init__(self, config):
    super().__init__(config)
    x, d, m = config.dalle, config.data, config.model
    if not 0 <= x.text_loss_weight < 1 or not 0 <= x.cond_drop_prob < 1:
      raise ConfigError(f"dalle.text_loss_weight and dalle.cond_drop_prob must be in [0, 1), got "
                        f"{x.text_loss_weight} and {x.cond_drop_prob}")
    if not x.vq_workdir:
      raise ConfigError("dalle.vq_workdir is empty: give a finished VQ autoencoder run (configs/mnist_vq.py)")
    self.vq_source = runs.RunSource("dalle.vq_workdir", x.vq_workdir, task="autoencoder", select=("vae",),
                                    frozen=True)
    vq = self.vq_source.task().vae_config
    if not isinstance(vq, VQConfig):
      raise ConfigError(f"dalle.vq_workdir={x.vq_workdir!r} is a KL autoencoder; DALL-E needs discrete codes "
                        "(vae.bottleneck='vq')")
    # As that run built it: an EMA codebook stays mutable state (restored from the run, never updated here).
    self.vq_config = vq
    if vq.in_channels != d.channels or d.image_size % vq.downsample_factor:
      raise ConfigError(f"the tokenizer takes {vq.in_channels}-channel images in multiples of "
                        f"{vq.downsample_factor} px; data has {d.channels} channels at {d.image_size} px")
    side = d.image_size // vq.downsample_factor
    self.tokenizer = tokenizers.get_tokenizer(d.tokenizer)
    self.null_tokens = np.asarray(self.tokenizer([""], d.max_text_len)[0], np.int32)
    lm = DecoderConfig(width=int(m.width), layers=int(m.layers), heads=int(m.heads), mlp_dim=int(m.mlp_dim),
                       act="gelu", norm="layer", positions="learned", dtype=compute_dtype(m.compute_dtype),
                       attention_impl=m.attention_impl or None)
    self.model_config = DalleConfig.build(lm, text_vocab=self.tokenizer.vocab_size, text_len=int(d.max_text_len),
                                          codes=vq.num_vq_embeddings, grid=(side, side))
    self.clip = None
    if x.clip_workdir:
      self.clip = clip_towers.FrozenClip("dalle.clip_workdir", x.clip_workdir, target="reranker",
                                         purpose="reranking")
    if int(config.sample.candidates) > 1 and self.clip is None:
      raise ConfigError(f"sample.candidates={config.sample.candidates} reranks with a CLIP run: set "
                        "dalle.clip_workdir (or candidates=1)")

  @property
  def reranks(self) -> bool:
    return self.clip is not None

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return DalleModel(self.vq_config, self.model_config, self.clip, rngs=rngs)

  def frozen(self):
    return parts.under("vae", "reranker")

  def weight_sources(self):
    return [self.vq_source] + ([self.clip.source] if self.clip is not None else [])

  # ------------------------------------------------------------------ training
  def codes(self, model, images: jax.Array) -> jax.Array:
    """The frozen tokenizer's codes of images, raster order [B, h·w]."""
    return jax.lax.stop_gradient(model.vae.tokenize(images)).reshape(images.shape[0], -1)

  def token_losses(self, model, text: jax.Array, codes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(−log p of each caption token after the first [B, L-1], its mask (not padding), −log p of each code [B, N])
    in nats."""
    cfg = self.model_config
    logits = model.transformer(text, codes)
    targets = model.transformer.sequence(text, codes)[:, 1:]
    text_nll = cross_entropy(logits[:, :cfg.text_len - 1], targets[:, :cfg.text_len - 1])
    text_mask = (text[:, 1:] != self.tokenizer.pad_id).astype(jnp.float32)
    image_nll = cross_entropy(logits[:, cfg.text_len:, :cfg.codes], codes)
    return text_nll, text_mask, image_nll

  def loss(self, model, batch, rng):
    x = self.config.dalle
    valid = batch["valid"].astype(jnp.float32)
    text = batch["tokens"]
    drop = jax.random.bernoulli(rng, x.cond_drop_prob, (text.shape[0],))
    text = jnp.where(drop[:, None], jnp.asarray(self.null_tokens)[None], text)
    codes = self.codes(model, batch["image"])
    text_nll, text_mask, image_nll = self.token_losses(model, text, codes)
    rows = jnp.maximum(jnp.sum(valid), 1.0)
    text_tokens = jnp.sum(text_mask * valid[:, None])
    text_loss = jnp.sum(text_nll * text_mask * valid[:, None]) / jnp.maximum(text_tokens, 1.0)
    image_loss = jnp.sum(jnp.mean(image_nll, axis=1) * valid) / rows
    w = float(x.text_loss_weight)
    return w * text_loss + (1 - w) * image_loss, {
        "text_loss": text_loss, "image_loss": image_loss, "image_bits_per_token": image_loss / math.log(2),
        "count/skipped_examples": jnp.sum(1.0 - valid)}

  # ------------------------------------------------------------------ likelihood
  def image_nll(self, model, images: jax.Array, text: jax.Array) -> jax.Array:
    """−log p(codes | caption) of each image, summed over its codes, in nats [B] (no caption dropout)."""
    return jnp.sum(self.token_losses(model, text, self.codes(model, images))[2], axis=1)

  # ------------------------------------------------------------------ sampling
  def draw_codes(self, model, inputs: dict, rng: jax.Array, guidance_scale: float, candidates: int = 1,
                 rows_given: int = 0) -> jax.Array:
    """Codes [B · candidates, N] for the captions `inputs['tokens']` [B, L], `candidates` draws of each (row-major);
    with `rows_given`, the first rows of the codes of `inputs['image']` kept and the rest drawn; traceable."""
    s, cfg = self.config.sample, self.model_config
    text = jnp.repeat(inputs["tokens"], candidates, axis=0)
    prefix = None
    if rows_given:
      prefix = jnp.repeat(self.codes(model, inputs["image"])[:, :rows_given * cfg.grid[1]], candidates, axis=0)
    return model.transformer.sample(text, jnp.asarray(self.null_tokens)[None], rng, guidance_scale=guidance_scale,
                                    temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p),
                                    prefix=prefix)

  def _generate_fn(self, guidance_scale: float, candidates: int, rows_given: int = 0):
    cfg = self.model_config

    def generate(model, inputs, rng):
      codes = self.draw_codes(model, inputs, rng, guidance_scale, candidates, rows_given)
      images = jnp.clip(model.vae.decode_indices(codes.reshape(-1, *cfg.grid)).astype(jnp.float32), -1.0, 1.0)
      if candidates == 1:
        return images
      scores = self._clip_scores(model.reranker, images, jnp.repeat(inputs["clip_tokens"], candidates, axis=0))
      best = jnp.argmax(scores.reshape(-1, candidates), axis=1)
      return images.reshape(-1, candidates, *images.shape[1:])[jnp.arange(best.shape[0]), best]

    return generate

  def _clip_scores(self, towers, images: jax.Array, tokens: jax.Array) -> jax.Array:
    unit = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    image = unit(self.clip.embed_images(towers, images).astype(jnp.float32))
    return jnp.sum(image * unit(towers.encode_text(tokens).astype(jnp.float32)), axis=-1)

  def prompt_inputs(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    inputs = {"tokens": np.asarray(self.tokenizer(list(prompts), self.config.data.max_text_len), np.int32)}
    if self.clip is not None:
      inputs["clip_tokens"] = self.clip.tokens(prompts)
    return inputs

  def generate(self, ctx: ModelContext, prompts: Sequence[str], seed: int, *, labels=None,
               guidance_scale: Optional[float] = None, candidates: Optional[int] = None,
               images: Optional[np.ndarray] = None, rows_given: int = 0) -> np.ndarray:
    """Images in [-1, 1] for `prompts`, the best of `candidates` (default `sample.candidates`) by the reranking CLIP;
    with `images` and `rows_given`, completions of their first `rows_given` rows of codes."""
    del labels  # the caption says it all
    s = self.config.sample
    scale = float(s.guidance_scale if guidance_scale is None else guidance_scale)
    n = int(s.candidates if candidates is None else candidates)
    if n > 1 and self.clip is None:
      raise ConfigError(f"reranking {n} candidates needs dalle.clip_workdir")
    if not 0 <= rows_given < self.model_config.grid[0]:
      raise ConfigError(f"rows_given={rows_given} must leave rows of the {self.model_config.grid[0]}-row grid to draw")
    chunk = max(1, min(int(s.batch_size) // max(n, 1), len(prompts)))
    fn = ctx.jit(self._generate_fn(scale, n, rows_given), key=(self, "generate", chunk, scale, n, rows_given))
    inputs = self.prompt_inputs(prompts)
    if rows_given:
      inputs["image"] = np.asarray(images, np.float32)
    logging.info("sampling %d images in chunks of %d: %d codes each, temperature %g, top-k %d, top-p %g, guidance "
                 "%g, best of %d", len(prompts), chunk, self.model_config.image_len, s.temperature, s.top_k, s.top_p,
                 scale, n)
    return host.run_chunked(fn, inputs, chunk, extra=lambda i: (jax.random.fold_in(jax.random.key(seed), i),),
                            desc="sampling")

  def label_prompts(self, per_class: int, template: str = "") -> tuple[list[str], np.ndarray]:
    return pipeline.label_prompts(self.config.data, per_class, template)

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    """`sample.per_prompt` images of each of `sample.prompts` (default: every class), the best of
    `sample.candidates` each; with `sample.complete_rows` > 0 instead, rows of `sample.complete_images` held-out
    images: the image, then `per_prompt` completions of its first `complete_rows` rows of codes under its caption."""
    s = self.config.sample
    per = int(s.per_prompt)
    if int(s.complete_rows):
      return self._completions(ctx, out_dir, int(s.complete_rows), int(s.complete_images), per)
    if s.prompts:
      prompts = [p for p in s.prompts for _ in range(per)]
    else:
      prompts, _ = self.label_prompts(per, s.template)
    images = self.generate(ctx, prompts, int(s.seed))
    if not ctx.is_main_process:
      return {}
    return image_io.save_samples(out_dir, images, prompts, grid_cols=per)

  def _completions(self, ctx: ModelContext, out_dir: str, rows: int, count: int, per: int) -> dict[str, Any]:
    d = self.config.data
    sources, captions = images_and_captions(ctx, d, d.eval_split, int(self.config.sample.batch_size), count,
                                            examples=self.data_examples, what="sample.complete_images")
    done = self.generate(ctx, [c for c in captions for _ in range(per)], int(self.config.sample.seed), candidates=1,
                         images=np.repeat(sources, per, axis=0), rows_given=rows)
    if not ctx.is_main_process:
      return {}
    grid = np.concatenate([sources[:, None], done.reshape(len(sources), per, *done.shape[1:])], axis=1)
    prompts = [c for c in captions for _ in range(per + 1)]
    extra = [{"example": i, "kind": "source" if j == 0 else f"completion of the first {rows} rows"}
             for i in range(len(sources)) for j in range(per + 1)]
    return image_io.save_samples(out_dir, grid.reshape(-1, *done.shape[1:]), prompts, grid_cols=per + 1,
                                 extra=extra)
