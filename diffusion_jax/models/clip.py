"""CLIP and SigLIP: a text transformer and a ViT, each projected into one embedding space.

The same modules load OpenAI / open_clip / transformers weights (`diffusion_jax.pretrained.clip`), serve as
Stable Diffusion's text encoder (`CLIPTextModel`, with SD2/SDXL's "clip skip"), and are trained from scratch by
the contrastive task (`CLIPModel`, with SigLIP's learnable logit bias as an option), and configured as the diffusion
task's jointly trained text encoder (`models/text.py`). SigLIP checkpoints are the same modules with a few options
(`CLIPTextConfig.causal`/'last' pooling, `CLIPConfig.projections='siglip'`, the MAP-pooled ViT). The blocks are the
shared `transformer.TransformerBlock`; `pretrained/clip.py` and `pretrained/siglip.py` map their parameter names to
transformers' CLIP and SigLIP.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models import layers, remat
from diffusion_jax.models.transformer import TransformerBlock
from diffusion_jax.models.vit import CLIPVisionConfig, CLIPVisionModel, tower_block, vit_config

Dtype = Any
TEXT_POOLINGS = ("argmax", "eos", "last_non_pad", "last")
PROJECTIONS = ("clip", "siglip")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The text tower. Defaults are OpenAI CLIP ViT-B's text transformer.

  pooling picks the token whose final state represents the caption: 'argmax' the position of the largest id (the
  end-of-text token is the largest id in CLIP's vocabulary; OpenAI's rule, and transformers' when its config says
  eos_token_id == 2), 'eos' the first position of eos_token_id (transformers otherwise), 'last_non_pad' the last
  position whose id is not pad_token_id (tokenizers whose end token is not the largest id), 'last' the last position
  whatever it holds (SigLIP, whose captions are always padded to the full context length). causal: each token attends
  only to itself and earlier ones (CLIP, so only the end token has seen the whole caption); False lets every token
  attend to all (SigLIP, where any position has seen the whole caption, so a fixed one can be pooled). init: 'clip' is open_clip's
  scaled init, 'lecun' flax's default (see `transformer.INITS`).
  """
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  act: str = "quick_gelu"
  pooling: str = "argmax"
  causal: bool = True
  eos_token_id: int = 49407
  pad_token_id: int = 0
  layer_norm_eps: float = 1e-5
  dtype: Dtype = None  # compute dtype; parameters stay float32
  attention_impl: Optional[str] = None  # None (attention.attend picks), 'host', 'xla' or 'cudnn'
  remat: str = "none"  # per encoder layer: 'none', 'full' or 'dots_saveable' (see models/remat.py)
  init: str = "clip"

  def __post_init__(self):
    tower_block("text", self, self.init)
    remat.check(self.remat)
    if self.pooling not in TEXT_POOLINGS:
      raise ValueError(f"text pooling {self.pooling!r} is not one of {TEXT_POOLINGS}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers and how their pooled outputs become embeddings of size embed_dim.

  projections: 'clip' projects each tower's pooled output with a bias-free linear map (`text_projection`,
  `visual_projection`); 'siglip' uses the image tower's pooled output as it is (its MAP head already maps into the
  embedding space, so vision.width must equal embed_dim) and projects the text with a linear map with a bias
  (transformers' `text_model.head`).
  """
  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  embed_dim: int = 512
  logit_scale_init: float = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
  logit_bias_init: Optional[float] = None  # set (with logit_scale_init=log(10), bias -10) for SigLIP's sigmoid loss
  projections: str = "clip"

  def __post_init__(self):
    if self.projections not in PROJECTIONS:
      raise ValueError(f"projections {self.projections!r} is not one of {PROJECTIONS}")
    if self.projections == "siglip" and self.vision.width != self.embed_dim:
      raise ValueError(f"projections 'siglip' use the image tower's output as the embedding: vision width "
                       f"{self.vision.width} must equal embed_dim {self.embed_dim}")


def pool_tokens(hidden: jax.Array, input_ids: jax.Array, cfg: CLIPTextConfig) -> jax.Array:
  """The state at each caption's pooling position (see `CLIPTextConfig`): [B, L, W] -> [B, W]."""
  if cfg.pooling == "last":
    return hidden[:, -1]
  if cfg.pooling == "argmax":
    index = jnp.argmax(input_ids, axis=-1)  # first maximum, as torch.argmax
  elif cfg.pooling == "eos":
    index = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)  # first EOS; 0 when there is none, as transformers
  else:
    is_token = (input_ids != cfg.pad_token_id)[:, ::-1]
    index = input_ids.shape[1] - 1 - jnp.argmax(is_token, axis=-1)
  return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


class CLIPTextModel(nnx.Module):
  """`model(input_ids int32 [B, L]) -> [B, L, W]`, the final-layer-normed states Stable Diffusion conditions on.

  `skip_last_layers=k` stops k blocks early ("clip skip"; k=1 is the penultimate layer). With it, `final_norm`
  chooses between SD 1.x/diffusers' `clip_skip` (final norm applied, the default) and SDXL/SD2's penultimate
  states (`final_norm=False`, transformers' `hidden_states[-2]` which has no final norm). There is no padding
  mask: with `causal` (CLIP) no state before a caption's end depends on the padding after it; without (SigLIP)
  every state sees the padding, as the model was trained with it.
  """

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    w, dt = cfg.width, cfg.dtype
    self.token_embedding = layers.embed(cfg.vocab_size, w, rngs=rngs, dtype=dt, stddev=0.02)
    self.position_embedding = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(0.01), (None, "embed"))(
        rngs.params(), (cfg.context_length, w)))
    block = tower_block("text", cfg, cfg.init)
    self.layers = nnx.List([TransformerBlock(block, rngs=rngs) for _ in range(cfg.layers)])
    self.final_layer_norm = layers.layer_norm(w, epsilon=cfg.layer_norm_eps, rngs=rngs, dtype=dt)

  def _check(self, input_ids: jax.Array, skip_last_layers: int) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] > self.config.context_length:
      raise ValueError(f"input_ids must be [batch, length <= {self.config.context_length}], got {input_ids.shape}")
    if not 0 <= skip_last_layers < self.config.layers:
      raise ValueError(f"skip_last_layers must be in [0, {self.config.layers}), got {skip_last_layers}")

  def _embed(self, input_ids: jax.Array) -> jax.Array:
    x = self.token_embedding(input_ids)
    return x + self.position_embedding[...][:input_ids.shape[1]].astype(x.dtype)[None]

  def __call__(self, input_ids: jax.Array, *, skip_last_layers: int = 0, final_norm: bool = True) -> jax.Array:
    self._check(input_ids, skip_last_layers)
    x = self._embed(input_ids)
    for layer in self.layers[:self.config.layers - skip_last_layers]:
      x = remat.apply(layer, self.config.remat, x, is_causal=self.config.causal)
    return self.final_layer_norm(x) if final_norm else x

  def encode(self, input_ids: jax.Array, *, skip_last_layers: int = 0,
             final_norm: bool = True) -> tuple[jax.Array, jax.Array]:
    """(hidden states as `__call__` gives them, pooled [B, W]) in one pass.

    pooled always comes from the last layer, final-normed (transformers' `pooler_output`), whatever
    skip_last_layers says: SDXL conditions on penultimate states and the last layer's pooled embedding together.
    """
    self._check(input_ids, skip_last_layers)
    x = self._embed(input_ids)
    states = None
    for i, layer in enumerate(self.layers):
      x = remat.apply(layer, self.config.remat, x, is_causal=self.config.causal)
      if i == self.config.layers - 1 - skip_last_layers:
        states = x
    last = self.final_layer_norm(x)
    if skip_last_layers == 0:
      states = last if final_norm else x
    elif final_norm:
      states = self.final_layer_norm(states)
    return states, pool_tokens(last, input_ids, self.config)


def _projection(width: int, embed_dim: int, rngs: nnx.Rngs, bias: bool = False) -> nnx.Linear:
  # The output dim stays unnamed: naming it 'embed' as well would ask for one mesh axis twice in a spec.
  return layers.dense(width, embed_dim, ("embed", None), use_bias=bias, rngs=rngs,
                      kernel_init=nnx.initializers.normal(width ** -0.5))


def _scalar(value: float) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(nnx.initializers.constant(value), ())(jax.random.key(0), ()))


# OpenAI CLIP's preprocessing constants, for towers initialised from a real checkpoint.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
PIXEL_NORMALIZATIONS = ("none", "clip")


def clip_pixels(images: jax.Array, normalization: str) -> jax.Array:
  """Pipeline images in [-1, 1] as a CLIP image tower takes them: as they are ('none', towers trained here) or
  with OpenAI's mean/std ('clip', towers from a real checkpoint)."""
  if normalization == "clip":
    x01 = (images + 1.0) * 0.5
    return (x01 - CLIP_MEAN[: images.shape[-1]]) / CLIP_STD[: images.shape[-1]]
  return images


class CLIPModel(nnx.Module):
  """Both towers and their projections: `model(pixels, input_ids) -> (image_embeds, text_embeds)`, unnormalised.

  `logit_scale` holds the log of the inverse temperature as transformers does; `temperature()` reads it clipped at
  100 as OpenAI does. With `logit_bias_init` set the model also has SigLIP's learnable `logit_bias`. With
  `projections='siglip'` there is no `visual_projection` (None) and `text_projection` has a bias.
  """

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.text_model = CLIPTextModel(cfg.text, rngs=rngs)
    self.vision_model = CLIPVisionModel(cfg.vision, rngs=rngs)
    siglip = cfg.projections == "siglip"
    self.text_projection = _projection(cfg.text.width, cfg.embed_dim, rngs, bias=siglip)
    self.visual_projection = None if siglip else _projection(cfg.vision.width, cfg.embed_dim, rngs)
    self.logit_scale = _scalar(cfg.logit_scale_init)
    if cfg.logit_bias_init is not None:
      self.logit_bias = _scalar(cfg.logit_bias_init)

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    """NHWC CLIP-normalised float pixels -> projected image embeddings [B, embed_dim] (not normalised)."""
    pooled = self.vision_model(pixels)[1]
    return pooled if self.visual_projection is None else self.visual_projection(pooled)

  def encode_text(self, input_ids: jax.Array) -> jax.Array:
    """int32 token ids [B, L] -> projected text embeddings [B, embed_dim] (not normalised)."""
    return self.text_projection(self.text_model.encode(input_ids)[1])

  def temperature(self) -> jax.Array:
    """exp(logit_scale) capped at 100 as in OpenAI's training (the gradient vanishes above the cap)."""
    return jnp.exp(jnp.minimum(self.logit_scale[...], math.log(100.0)))

  def logits(self, image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """[images, texts] logits: cosine similarities times exp(logit_scale), plus logit_bias when the model has one
    (transformers' `logits_per_image`). Not capped like `temperature()`: SigLIP trains the scale without a cap,
    so capping here would change the logits its bias was learnt with."""
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    logits = norm(image_embeds) @ norm(text_embeds).T * jnp.exp(self.logit_scale[...])
    return logits + self.logit_bias[...] if hasattr(self, "logit_bias") else logits

  def __call__(self, pixels: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encode_image(pixels), self.encode_text(input_ids)


class CLIPTextModelWithProjection(nnx.Module):
  """The text tower with its projection alone (transformers' class of the same name; SDXL's second encoder).

  `model(input_ids, *, skip_last_layers=0, final_norm=True) -> (hidden [B, L, W], text_embeds [B, embed_dim])`.
  """

  def __init__(self, cfg: CLIPTextConfig, embed_dim: int, *, rngs: nnx.Rngs):
    self.config = cfg
    self.text_model = CLIPTextModel(cfg, rngs=rngs)
    self.text_projection = _projection(cfg.width, embed_dim, rngs)

  def encode_text(self, input_ids: jax.Array) -> jax.Array:
    return self.text_projection(self.text_model.encode(input_ids)[1])

  def __call__(self, input_ids: jax.Array, *, skip_last_layers: int = 0,
               final_norm: bool = True) -> tuple[jax.Array, jax.Array]:
    states, pooled = self.text_model.encode(input_ids, skip_last_layers=skip_last_layers, final_norm=final_norm)
    return states, self.text_projection(pooled)


class CLIPVisionModelWithProjection(nnx.Module):
  """The image tower with its projection alone (transformers' class of the same name; IP-Adapter's encoder).

  `model(pixels, *, skip_last_layers=0) -> (hidden [B, N, W], image_embeds [B, embed_dim])`.
  """

  def __init__(self, cfg: CLIPVisionConfig, embed_dim: int, *, rngs: nnx.Rngs):
    self.config = cfg
    self.vision_model = CLIPVisionModel(cfg, rngs=rngs)
    self.visual_projection = _projection(cfg.width, embed_dim, rngs)

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    return self.visual_projection(self.vision_model(pixels)[1])

  def __call__(self, pixels: jax.Array, *, skip_last_layers: int = 0) -> tuple[jax.Array, jax.Array]:
    states, pooled = self.vision_model(pixels, skip_last_layers=skip_last_layers)
    return states, self.visual_projection(pooled)


__all__ = ["CLIP_MEAN", "CLIP_STD", "clip_pixels", "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection",
           "CLIPVisionConfig", "CLIPVisionModel", "CLIPVisionModelWithProjection", "pool_tokens", "vit_config"]
