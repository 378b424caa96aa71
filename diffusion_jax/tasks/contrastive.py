"""Contrastive image–text pre-training (CLIP's softmax InfoNCE or SigLIP's sigmoid loss) on the shared trainer.

The batch is the pipeline's usual {'image', 'tokens', 'label', 'valid'}; the loss contrasts every image with every
caption of the global batch (see `diffusion_jax.contrastive.losses`). A locked image tower (LiT) is a
`stop_gradient` on the image embeddings — so XLA drops the tower's backward pass — plus frozen optimizer entries,
so weight decay does not move it either. Evaluation is zero-shot classification over the data's class names and
image↔text retrieval on the eval split.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from diffusion_jax.config import ConfigError
from diffusion_jax.contrastive import losses, zero_shot
from diffusion_jax.data import pipeline, tokenizers
from diffusion_jax.models import remat
from diffusion_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from diffusion_jax.tasks.base import ModelContext, Task, register

# OpenAI CLIP's preprocessing constants, for towers initialised from a real checkpoint.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
LOSSES = ("clip", "siglip")


def _dtype(name: str):
  return None if name in ("", "float32") else jnp.dtype(name)


def clip_config(config, tokenizer) -> CLIPConfig:
  """The CLIP model the `model` and `contrastive` sections describe (towers sized by field or ViT variant)."""
  m, d, c = config.model, config.data, config.contrastive
  dtype, impl, policy = _dtype(m.compute_dtype), (m.attention_impl or None), remat.from_config(m)
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
    if config.contrastive.loss not in LOSSES:
      raise ConfigError(f"contrastive.loss must be one of {LOSSES}, got {config.contrastive.loss!r}")
    if config.model.pixel_normalization not in ("none", "clip"):
      raise ConfigError(f"model.pixel_normalization must be 'none' or 'clip', got "
                        f"{config.model.pixel_normalization!r}")
    if int(config.train.get("grad_accum_steps", 1)) > 1:
      # Every image is contrasted with every caption of the batch: micro-batches would see fewer negatives, a
      # different objective rather than the same one in less memory.
      raise ConfigError("train.grad_accum_steps > 1 would contrast each micro-batch only with itself, changing the "
                        "contrastive loss; use train.grad_accum_steps=1 (and model.remat to save memory)")
    self.tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
    self._pretrained = None
    if config.model.init_from:
      from diffusion_jax import pretrained
      self._pretrained = pretrained.load(config.model.init_from, allow_pickle=bool(config.model.allow_pickle))
      if not isinstance(self._pretrained, CLIPModel):
        raise ConfigError(f"model.init_from={config.model.init_from!r} holds a "
                          f"{type(self._pretrained).__name__}, not a CLIPModel")
      cfg, policy = self._pretrained.config, remat.from_config(config.model)
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

  def initial_weights(self):
    if self._pretrained is None:
      return None
    from diffusion_jax.pretrained import weights
    return weights.model_arrays(self._pretrained)

  def frozen_parameters(self) -> tuple[str, ...]:
    return (r"vision_model\.", r"visual_projection\.") if self.config.model.lock_image_tower else ()

  def _pixels(self, images: jax.Array) -> jax.Array:
    if self.config.model.pixel_normalization == "clip":
      x01 = (images + 1.0) * 0.5
      return (x01 - CLIP_MEAN[: images.shape[-1]]) / CLIP_STD[: images.shape[-1]]
    return images

  def embed(self, model: CLIPModel, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    image_emb = model.encode_image(self._pixels(images))
    if self.config.model.lock_image_tower:
      image_emb = jax.lax.stop_gradient(image_emb)
    return image_emb, model.encode_text(tokens)

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
  def _gather(self, x) -> np.ndarray:
    if jax.process_count() > 1:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))

  def eval_embeddings(self, ctx: ModelContext) -> dict[str, np.ndarray]:
    """Image and caption embeddings, tokens and labels of (up to `eval.max_examples` of) the eval split."""
    e, data = self.config.eval, self.config.data
    ds = pipeline.make_dataset(data, data.eval_split, global_batch_size=int(e.batch_size), seed=0,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               shuffle=False, repeat=False, drop_remainder=False)
    encode = ctx.jit_apply(lambda model, batch: self.embed(model, batch["image"], batch["tokens"]))
    out = {"image": [], "text": [], "tokens": [], "label": []}
    seen = 0
    for batch in ds:
      image_emb, text_emb = encode(ctx.global_batch(batch))
      valid = self._gather(ctx.global_batch({"v": batch["valid"]})["v"]) > 0
      out["image"].append(self._gather(image_emb)[valid])
      out["text"].append(self._gather(text_emb)[valid])
      for key in ("tokens", "label"):
        out[key].append(self._gather(ctx.global_batch({key: batch[key]})[key])[valid])
      seen += int(e.batch_size)
      if e.max_examples and seen >= e.max_examples:
        break
    return {k: np.concatenate(v)[: e.max_examples or None] for k, v in out.items()}

  def encode_texts(self, ctx: ModelContext, texts: list[str]) -> np.ndarray:
    """Text embeddings of arbitrary prompts, in fixed-size chunks so one program is compiled."""
    chunk = int(self.config.eval.batch_size)
    tokens = self.tokenizer(list(texts), self.config.data.max_text_len)
    fn = ctx.jit_apply(lambda model, t: model.encode_text(t))
    out = []
    for start in range(0, len(tokens), chunk):
      part = tokens[start:start + chunk]
      n = len(part)
      if n < chunk:
        part = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
      out.append(self._gather(fn(part))[:n])
    return np.concatenate(out)

  def evaluate(self, ctx: ModelContext) -> dict[str, float]:
    e, data = self.config.eval, self.config.data
    emb = self.eval_embeddings(ctx)
    metrics: dict[str, float] = {"eval/examples": float(len(emb["image"]))}
    if e.zero_shot:
      templates = tuple(e.zero_shot_templates) or tuple(data.caption_templates)
      prompts = zero_shot.class_prompts(data.class_names, templates)
      classes = zero_shot.class_embeddings(self.encode_texts(ctx, prompts), len(data.class_names))
      acc = zero_shot.topk_accuracy(emb["image"], classes, emb["label"])
      metrics.update({f"eval/zero_shot_{k}": v for k, v in acc.items()})
    if e.retrieval:
      unique_tokens, text_ids = zero_shot.dedupe_texts(emb["tokens"])
      # one embedding per distinct caption: the first image's copy (identical tokens give identical embeddings)
      first = np.array([np.flatnonzero(text_ids == i)[0] for i in range(len(unique_tokens))])
      recall = zero_shot.retrieval_recall(emb["image"], emb["text"][first], text_ids)
      metrics.update({f"eval/{k}": v for k, v in recall.items()})
      metrics["eval/distinct_captions"] = float(len(unique_tokens))
    logging.info("contrastive eval: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    return {}  # nothing to draw from a contrastive model
