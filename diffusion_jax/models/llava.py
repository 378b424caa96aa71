"""A LLaVA-style vision–language model: a ViT's patch features, projected into a causal language model's input
embeddings at the image placeholder tokens (Liu et al. 2023, "Visual Instruction Tuning"; LLaVA-1.5's MLP projector).

  vlm = LlavaModel(LlavaConfig(vision=..., text=..., image_token_id=...), rngs=nnx.Rngs(0))
  logits = vlm(input_ids, pixels)                       # input_ids hold image_token_id num_image_tokens times
  out = vlm.generate(input_ids, pixels, max_new_tokens=16)

The parts are named as the trainer's filters and `pretrained.llava` see them: `vision_model` (our CLIP/SigLIP
`CLIPVisionModel`, the same name as in `CLIPModel`, so a contrastive run's tower loads as it is), `projector` and
`language_model` (a `DecoderLM`). Each row holds one image: its k-th image token takes the k-th image feature.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.autoregressive import sampler
from diffusion_jax.models import layers
from diffusion_jax.models.attention import KVCache
from diffusion_jax.models.decoder import DecoderConfig, DecoderLM
from diffusion_jax.models.transformer import ACTIVATIONS
from diffusion_jax.models.vit import CLIPVisionConfig, CLIPVisionModel

PROJECTORS = ("linear", "mlp2x_gelu")
FEATURE_SELECTS = ("default", "full")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
  """feature_layer is transformers' `vision_feature_layer`: an index into the tower's hidden states, where -1 is the
  last block's output and -2 the penultimate one (LLaVA's choice: the last block is shaped by the contrastive
  objective more than by the image). feature_select 'default' drops the first token (the class token of a CLIP tower;
of a tower without one, such as SigLIP's, the first patch, as transformers' LLaVA does), 'full' keeps every token.
  projector 'linear' is LLaVA-1's single matrix, 'mlp2x_gelu' LLaVA-1.5's two layers with GELU between."""
  vision: CLIPVisionConfig
  text: DecoderConfig
  image_token_id: int
  projector: str = "mlp2x_gelu"
  projector_act: str = "gelu"
  projector_bias: bool = True
  feature_layer: int = -2
  feature_select: str = "default"

  def __post_init__(self):
    if self.projector not in PROJECTORS:
      raise ValueError(f"projector {self.projector!r} is not one of {PROJECTORS}")
    if self.feature_select not in FEATURE_SELECTS:
      raise ValueError(f"feature_select {self.feature_select!r} is not one of {FEATURE_SELECTS}")
    if self.projector_act not in ACTIVATIONS:
      raise ValueError(f"projector_act {self.projector_act!r} is not one of {sorted(ACTIVATIONS)}")
    self.skip_last_layers  # noqa: B018  (validates feature_layer)
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ValueError(f"image_token_id {self.image_token_id} is outside the language model's vocabulary "
                       f"of {self.text.vocab_size}")

  @property
  def skip_last_layers(self) -> int:
    """feature_layer as blocks counted back from the last (hidden state 0, the embeddings, is not supported)."""
    n = self.vision.layers
    index = self.feature_layer if self.feature_layer < 0 else self.feature_layer - n - 1
    if not -n <= index <= -1:
      raise ValueError(f"feature_layer {self.feature_layer} does not name one of the vision tower's {n} blocks "
                       f"(-1 .. -{n}, or 1 .. {n})")
    return -1 - index

  @property
  def has_class_token(self) -> bool:
    return self.vision.pooling == "cls"

  @property
  def num_image_tokens(self) -> int:
    """Placeholder tokens per image: one per patch, plus the class token, less the first token with 'default' (so a
    tower without class token gives grid² - 1 with 'default', as transformers' LlavaProcessor counts)."""
    return self.vision.grid ** 2 + int(self.has_class_token) - int(self.feature_select == "default")


class Projector(nnx.Module):
  """Vision features → language-model embeddings; names as transformers' `LlavaMultiModalProjector`."""

  def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
    v, t = cfg.vision.width, cfg.text.width
    self.act = cfg.projector_act
    self.linear_1 = layers.dense(v, t, ("embed", "mlp"), use_bias=cfg.projector_bias, rngs=rngs)
    self.linear_2 = None if cfg.projector == "linear" else layers.dense(
        t, t, ("mlp", "embed"), use_bias=cfg.projector_bias, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.linear_1(x)
    return x if self.linear_2 is None else self.linear_2(ACTIVATIONS[self.act](x))


class LlavaModel(nnx.Module):
  """`model(input_ids [B, T], pixels [B, H, W, C]) -> logits [B, T, vocab]`; `decode`/`init_cache` for the sampler."""

  def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.vision_model = CLIPVisionModel(cfg.vision, rngs=rngs)
    self.projector = Projector(cfg, rngs=rngs)
    self.language_model = DecoderLM(cfg.text, rngs=rngs)

  def image_features(self, pixels: jax.Array) -> jax.Array:
    """[B, num_image_tokens, text width]: the chosen layer's tokens, projected."""
    states, _ = self.vision_model(pixels, skip_last_layers=self.config.skip_last_layers)
    if self.config.feature_select == "default":
      # transformers' LLaVA drops the first token whatever the tower (`selected_image_feature[:, 1:]`): a class-token
      # free tower (SigLIP) loses its first patch. Done the same here for parity; SigLIP LLaVAs normally say 'full'.
      states = states[:, 1:]
    return self.projector(states)

  def embed(self, input_ids: jax.Array, pixels: jax.Array) -> jax.Array:
    """Token embeddings with the image tokens replaced, in order, by the image's features."""
    is_image = input_ids == self.config.image_token_id
    text = self.language_model.embed_tokens(input_ids)
    features = self.image_features(pixels).astype(text.dtype)
    # The k-th image token of a row takes feature k; the clip keeps text positions' (unused) gathers in range.
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    spliced = jnp.take_along_axis(features, index[..., None], axis=1)
    return jnp.where(is_image[..., None], spliced, text)

  def __call__(self, input_ids: jax.Array, pixels: jax.Array, positions: Optional[jax.Array] = None) -> jax.Array:
    return self.language_model(input_ids, positions, embeddings=self.embed(input_ids, pixels))

  def init_cache(self, batch: int, max_len: int, dtype: Any = jnp.float32) -> tuple[KVCache, ...]:
    return self.language_model.init_cache(batch, max_len, dtype)

  def decode(self, tokens: jax.Array, positions: jax.Array, cache: tuple[KVCache, ...],
             valid: Optional[jax.Array] = None, pixels: Optional[jax.Array] = None):
    """`DecoderLM.decode`; the prompt's call (prefill) passes `pixels`, later tokens are text only."""
    embeddings = None if pixels is None else self.embed(tokens, pixels)
    return self.language_model.decode(tokens, positions, cache, valid, embeddings=embeddings)

  def generate(self, input_ids: Any, pixels: Any, max_new_tokens: int, *, lengths: Any = None,
               rng: Optional[jax.Array] = None, **sampling) -> jax.Array:
    """As `DecoderLM.generate`, for prompts that hold their image's placeholder tokens."""
    return sampler.generate(self, input_ids, max_new_tokens, lengths=lengths, rng=rng,
                            prefill={"pixels": jnp.asarray(pixels, jnp.float32)}, **sampling)


__all__ = ["FEATURE_SELECTS", "LlavaConfig", "LlavaModel", "PROJECTORS", "Projector"]
