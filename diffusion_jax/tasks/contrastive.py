"""Contrastive image–text pre-training (CLIP's softmax InfoNCE or SigLIP's sigmoid loss) on the shared trainer.

The batch is the pipeline's usual {'image', 'tokens', 'label', 'valid'}; the loss contrasts every image with every
caption of the global batch (see `diffusion_jax.contrastive.losses`). A locked image tower (LiT) is a frozen part
of the model: no gradient, optimizer state or EMA for it, and since nothing trained feeds it XLA computes no
backward pass through it. `model.init_from` starts both towers from a transformers CLIP folder. Evaluation is by
the `zero_shot` and `retrieval` evaluators.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.config import ConfigError, compute_dtype
from diffusion_jax.contrastive import losses
from diffusion_jax.data import tokenizers
from diffusion_jax.models import remat
from diffusion_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, clip_pixels
from diffusion_jax.parallel import host
from diffusion_jax.train import parts, runs
from diffusion_jax.train.evaluators import split_outputs
from diffusion_jax.train.task import ModelContext, Task, register

LOSSES = ("clip", "siglip")


def clip_config(config, tokenizer) -> CLIPConfig:
  """The CLIP model the `model` and `contrastive` sections describe (towers sized by field or ViT variant)."""
  m, d, c = config.model, config.data, config.contrastive
  dtype, impl, policy = compute_dtype(m.compute_dtype), (m.attention_impl or None), remat.from_config(m)
  if m.vision_variant:
    from diffusion_jax.models.vit import vit_config
    vision = vit_config(m.vision_variant, image_size=d.image_size, channels=d.channels, act=m.act,
                        pooling=m.vision_pooling, dtype=dtype, attention_impl=impl, remat=policy)
  else:
    vision = CLIPVisionConfig(
        image_size=d.image_size, patch_size=m.patch_size, channels=d.channels, width=m.vision_width,
        layers=m.vision_layers, heads=m.vision_heads, mlp_dim=m.vision_width * m.mlp_ratio, act=m.act,
        pooling=m.vision_pooling, dtype=dtype, attention_impl=impl, remat=policy)
  text = CLIPTextConfig(
      vocab_size=tokenizer.vocab_size, context_length=d.max_text_len, width=m.text_width, layers=m.text_layers,
      heads=m.text_heads, mlp_dim=m.text_width * m.mlp_ratio, act=m.act, pooling="eos",
      eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id, dtype=dtype, attention_impl=impl,
      remat=policy)
  scale_init = c.logit_scale_init if c.logit_scale_init is not None else (
      math.log(10.0) if c.loss == "siglip" else math.log(1 / 0.07))
  bias_init = (c.logit_bias_init if c.logit_bias_init is not None else -10.0) if c.loss == "siglip" else None
  return CLIPConfig(text=text, vision=vision, embed_dim=m.embed_dim, logit_scale_init=scale_init,
                    logit_bias_init=bias_init)


@register("contrastive")
class ContrastiveTask(Task):

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    if config.contrastive.loss not in LOSSES:
      raise ConfigError(f"contrastive.loss must be one of {LOSSES}, got {config.contrastive.loss!r}")
    if m.pixel_normalization not in ("none", "clip"):
      raise ConfigError(f"model.pixel_normalization must be 'none' or 'clip', got {m.pixel_normalization!r}")
    if int(config.train.grad_accum_steps) > 1:
      # Every image is contrasted with every caption of the batch: micro-batches would see fewer negatives, a
      # different objective rather than the same one in less memory.
      raise ConfigError("train.grad_accum_steps > 1 would contrast each micro-batch only with itself, changing the "
                        "contrastive loss; use train.grad_accum_steps=1 (and model.remat to save memory)")
    self.tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
    self.init_source = None
    if m.init_from:
      from diffusion_jax import pretrained
      # With a locked image tower the folder is read at every start: the tower is frozen, not checkpointed.
      self.init_source = runs.ModuleSource(
          "model.init_from", m.init_from, lambda p: pretrained.load(p, allow_pickle=bool(m.allow_pickle)),
          frozen=bool(m.lock_image_tower), expect=CLIPModel)
      cfg, policy = self.init_source.module().config, remat.from_config(m)
      # Remat changes how blocks run, not what they hold: the checkpoint's weights load under any policy.
      self.model_config = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, remat=policy),
                                              vision=dataclasses.replace(cfg.vision, remat=policy))
      if config.data.max_text_len > self.model_config.text.context_length:
        raise ConfigError(f"data.max_text_len={config.data.max_text_len} exceeds the pretrained text tower's "
                          f"context length {self.model_config.text.context_length}")
    else:
      self.model_config = clip_config(config, self.tokenizer)

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return CLIPModel(self.model_config, rngs=rngs)

  def frozen(self):
    return parts.under("vision_model", "visual_projection") if self.config.model.lock_image_tower else nnx.Nothing()

  def weight_sources(self):
    return [self.init_source] if self.init_source is not None else []

  def pixels(self, images: jax.Array) -> jax.Array:
    return clip_pixels(images, self.config.model.pixel_normalization)

  def embed(self, model: CLIPModel, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model.encode_image(self.pixels(images)), model.encode_text(tokens)

  # ------------------------------------------------------------------ training
  def loss(self, model, batch, rng):
    del rng  # deterministic given the batch
    image_emb, text_emb = self.embed(model, batch["image"], batch["tokens"])
    scale = model.temperature()
    if self.config.contrastive.loss == "clip":
      loss, metrics = losses.clip_loss(image_emb, text_emb, scale, batch["valid"])
    else:
      bias = model.logit_bias[...]
      loss, metrics = losses.siglip_loss(image_emb, text_emb, scale, bias, batch["valid"])
      metrics["logit_bias"] = bias
    metrics.update({"logit_scale": scale, "count/skipped_examples": jnp.sum(1.0 - batch["valid"])})
    return loss, metrics

  # ------------------------------------------------------------------ evaluation
  def _embed_batch(self, model, batch):
    image_emb, text_emb = self.embed(model, batch["image"], batch["tokens"])
    return {"image": image_emb, "text": text_emb, "tokens": batch["tokens"], "label": batch["label"]}

  def eval_embeddings(self, ctx: ModelContext, split: str, batch_size: int, max_examples: int
                      ) -> dict[str, np.ndarray]:
    """Image and caption embeddings, tokens and labels of (up to `max_examples` of) a split."""
    return split_outputs(ctx, self.config.data, split, batch_size,
                         ctx.jit(self._embed_batch), max_examples=max_examples)

  def _encode_text(self, model, tokens):
    return model.encode_text(tokens)

  def encode_texts(self, ctx: ModelContext, texts: list[str], batch_size: int) -> np.ndarray:
    """Text embeddings of arbitrary prompts, in fixed-size chunks so one program is compiled."""
    tokens = self.tokenizer(list(texts), self.config.data.max_text_len)
    return host.run_chunked(ctx.jit(self._encode_text), np.asarray(tokens, np.int32), batch_size)
