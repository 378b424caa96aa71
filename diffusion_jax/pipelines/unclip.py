"""DALL-E 2 / Karlo: text → CLIP image embedding (prior) → 64 px image (decoder) → 256 px (super-resolution), and image
variations, each call one compiled program.

  from diffusion_jax import pretrained
  pipe = pretrained.load_pipeline('path/to/karlo-v1-alpha')                 # a diffusers UnCLIPPipeline folder
  images = pipe(['a high-resolution photograph of a cat'], seed=0)           # uint8 [B, 256, 256, 3]
  vary = pretrained.load_pipeline('path/to/karlo-v1-alpha-image-variations')
  images = vary([photo], seed=0)                                             # UnCLIPImageVariationPipeline

Semantics are those of diffusers' UnCLIPPipeline / UnCLIPImageVariationPipeline, so that the same folder and the same
noise give the same images: the prompt padded to the tokenizer's length with its attention mask; classifier-free
guidance (the empty prompt, and for the decoder Karlo's learned null image embedding) whenever either guidance scale
is above 1, at the prior's and the decoder's own scale; guidance on the decoder's ε channels only, its variance
taken from the conditional half; the decoder's image clamped to [-1, 1], upsampled bicubically (antialiased, as
torch's `interpolate(..., antialias=True)`) and concatenated to the super-resolution input, with `super_res_last`
taking the final step. Random draws use JAX's generator; `prior_latents`, `decoder_latents` and `super_res_latents`
(standard normal, images NHWC) and `step_noise` (each stage's per-step noise, {stage: [steps, *latents.shape]}) are
how a run is replayed exactly, e.g. against diffusers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.diffusion import samplers
from diffusion_jax.pipelines.images import to_uint8
from diffusion_jax.models.unclip import guidance_batch
from diffusion_jax.pipelines.latent_chain import SamplerSettings

STAGES = ("prior", "decoder", "super_res")


def upsample_bicubic(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """NHWC images resized to `size` with antialiased bicubic weights (Keys a = -0.5, weights renormalised at the
  borders): what torch's `interpolate(mode='bicubic', align_corners=False, antialias=True)` and PIL compute."""
  return jax.image.resize(images, (images.shape[0], *size, images.shape[-1]), "bicubic", antialias=True)


@dataclasses.dataclass(frozen=True)
class _Static:
  """What a program is specialised on besides input shapes."""
  steps: tuple[int, int, int]  # prior, decoder, super-resolution
  guided: bool
  step_noise: bool
  given_embeddings: bool  # a variation pipeline given image embeddings instead of images


class UnCLIPPipeline:
  """diffusers' UnCLIPPipeline (with `prior`) or UnCLIPImageVariationPipeline (with `image_encoder` and
  `preprocess`); see the module docstring. Modules are NNX; their parameters are read once at construction."""

  def __init__(self, *, text_encoder, tokenizer, text_proj, decoder, super_res_first, super_res_last,
               schedulers: Mapping[str, SamplerSettings], max_length: int, sizes: Mapping[str, int], prior=None,
               image_encoder=None, preprocess=None):
    if (prior is None) == (image_encoder is None):
      raise ValueError("an unCLIP pipeline has either a prior (text → image) or an image encoder (variations)")
    self.text_encoder, self.tokenizer, self.text_proj = text_encoder, tokenizer, text_proj
    self.decoder, self.super_res_first, self.super_res_last = decoder, super_res_first, super_res_last
    self.prior, self.image_encoder, self.preprocess = prior, image_encoder, preprocess
    self.schedulers = dict(schedulers)
    self.max_length = int(max_length)
    self.sizes = dict(sizes)  # image side of the decoder and of the super-resolution stage (their sample_size)
    self._modules = {k: v for k, v in dict(text_encoder=text_encoder, prior=prior, image_encoder=image_encoder,
                                           text_proj=text_proj, decoder=decoder, super_res_first=super_res_first,
                                           super_res_last=super_res_last).items() if v is not None}
    self._graphdefs = {k: nnx.graphdef(m) for k, m in self._modules.items()}
    self._states = {k: nnx.state(m) for k, m in self._modules.items()}
    self._programs: dict[_Static, Any] = {}
    self.trace_count = 0

  @property
  def is_variation(self) -> bool:
    return self.image_encoder is not None

  # ------------------------------------------------------------------------------------------------ shapes
  def _shapes(self, batch: int) -> dict[str, tuple]:
    dec, sr = self.sizes["decoder"], self.sizes["super_res"]
    out = {"decoder": (batch, dec, dec, self.decoder.config.in_channels),
           "super_res": (batch, sr, sr, self.super_res_first.config.in_channels // 2)}
    if self.prior is not None:
      out["prior"] = (batch, self.prior.config.embedding_dim)
    return out

  # ------------------------------------------------------------------------------------------------ the program
  def _program(self, static: _Static):
    program = self._programs.get(static)
    if program is None:
      program = jax.jit(lambda states, inputs: self._run(static, states, inputs))
      self._programs[static] = program
    return program

  def _run(self, static: _Static, states: dict, inputs: dict) -> jax.Array:
    self.trace_count += 1
    m = {k: nnx.merge(self._graphdefs[k], s) for k, s in states.items()}
    guided = static.guided
    tokens, mask = inputs["tokens"], inputs["mask"]
    if guided:
      n = tokens.shape[0]
      tokens = jnp.concatenate([jnp.broadcast_to(inputs["null_tokens"], tokens.shape), tokens])
      mask = jnp.concatenate([jnp.broadcast_to(inputs["null_mask"], mask.shape), mask])
    states_txt, prompt_embeds = m["text_encoder"](tokens)  # uncond rows first when guided, as diffusers
    keys = dict(zip(STAGES, jax.random.split(inputs["rng"], 3)))

    def chain(stage, model_fn, noise, steps):
      s = self.schedulers[stage]
      step_noise = inputs["step_noise"][stage] if static.step_noise else None
      return samplers.sample(model_fn, s.schedule, noise, None if static.step_noise else keys[stage], sampler=s.name,
                             num_steps=steps, step_noise=step_noise, **s.options)

    def swap_halves(fn):
      # Our guidance helpers put the conditional half first; the text rows here are uncond-first.
      def batched(x, t):
        half = x.shape[0] // 2
        out = fn(jnp.concatenate([x[half:], x[:half]]), jnp.concatenate([t[half:], t[:half]]))
        return jnp.concatenate([out[half:], out[:half]])
      return batched

    if self.prior is not None:
      def prior_fn(x, t):
        return m["prior"](x, t, proj_embedding=prompt_embeds, encoder_hidden_states=states_txt,
                          attention_mask=mask)
      fn = samplers.classifier_free_guidance(swap_halves(prior_fn), inputs["prior_scale"]) if guided else prior_fn
      emb = chain("prior", fn, inputs["prior_latents"], static.steps[0])
      image_embeds = m["prior"].post_process_latents(emb)
    elif static.given_embeddings:
      image_embeds = inputs["image_embeds"]
    else:
      image_embeds = m["image_encoder"](inputs["pixels"])[1]

    if guided:
      image_rows, drop = guidance_batch(image_embeds)
    else:
      image_rows, drop = image_embeds, None
    context, additive = m["text_proj"](image_rows, prompt_embeds, states_txt, drop_image=drop)
    extra = context.shape[1] - mask.shape[1]
    context_mask = jnp.concatenate([jnp.ones((mask.shape[0], extra), bool), mask], axis=1)

    def decoder_fn(x, t):
      return m["decoder"](x, t, context, class_labels=additive, encoder_attention_mask=context_mask)

    fn = samplers.guided_learned_range(swap_halves(decoder_fn), inputs["decoder_scale"]) if guided else decoder_fn
    small = jnp.clip(chain("decoder", fn, inputs["decoder_latents"], static.steps[1]), -1.0, 1.0)

    low = upsample_bicubic(small, inputs["super_res_latents"].shape[1:3])
    last_t = int(samplers.unclip_timesteps(self.schedulers["super_res"].schedule.num_timesteps, static.steps[2])[-1])

    def super_res_fn(x, t):
      x = jnp.concatenate([x, low.astype(x.dtype)], axis=-1)
      return jax.lax.cond(t[0] == last_t, lambda: m["super_res_last"](x, t), lambda: m["super_res_first"](x, t))

    image = chain("super_res", super_res_fn, inputs["super_res_latents"], static.steps[2])
    return jnp.clip(image * 0.5 + 0.5, 0.0, 1.0)

  # ------------------------------------------------------------------------------------------------ public calls
  def _tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(self.tokenizer(list(texts), self.max_length), np.int32)
    lengths = [min(len(self.tokenizer.encode(t)) + 2, self.max_length) for t in texts]  # bos + text + eos
    mask = np.arange(self.max_length)[None] < np.asarray(lengths)[:, None]
    return ids, mask

  def __call__(self, inputs, *, num_images_per_prompt: int = 1, prior_num_inference_steps: int = 25,
               decoder_num_inference_steps: int = 25, super_res_num_inference_steps: int = 7,
               prior_guidance_scale: float = 4.0, decoder_guidance_scale: float = 8.0, prior_latents=None,
               decoder_latents=None, super_res_latents=None, image_embeddings=None, seed: int = 0,
               step_noise: Optional[Mapping[str, Any]] = None, output_type: str = "uint8") -> np.ndarray:
    """Images [B * num_images_per_prompt, H, W, 3], uint8 (or float in [0, 1] with output_type='float').

    `inputs`: prompts (a string or list of strings) for a text-to-image pipeline; images (PIL, uint8 or float
    arrays) for a variation pipeline, which may instead be given `image_embeddings` [B, D] (and `inputs=None`).
    Latents are diffusers' arrays (images NHWC); a variation pipeline has no prior, so no prior_* arguments.
    """
    if self.is_variation:
      if image_embeddings is not None:
        pixels, count = None, len(image_embeddings)
      else:
        images = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        pixels, count = np.stack([self.preprocess(im) for im in images]), len(images)
      texts = [""] * count
      guided = decoder_guidance_scale > 1.0
    else:
      texts = [inputs] if isinstance(inputs, str) else list(inputs)
      guided = prior_guidance_scale > 1.0 or decoder_guidance_scale > 1.0
      count = len(texts)
    if count == 0:
      raise ValueError("no prompts or images given")
    n = count * int(num_images_per_prompt)
    tokens, mask = self._tokens(texts)
    null_tokens, null_mask = self._tokens([""])
    rep = lambda a: np.repeat(a, num_images_per_prompt, axis=0)
    shapes = self._shapes(n)
    rng = jax.random.key(seed)
    given = {"prior": prior_latents, "decoder": decoder_latents, "super_res": super_res_latents}
    arrays = {"tokens": rep(tokens), "mask": rep(mask), "null_tokens": null_tokens, "null_mask": null_mask,
              "rng": jax.random.fold_in(rng, 1), "prior_scale": np.float32(prior_guidance_scale),
              "decoder_scale": np.float32(decoder_guidance_scale)}
    for i, stage in enumerate(STAGES):
      if stage not in shapes:
        if given[stage] is not None:
          raise ValueError(f"{stage}_latents given, but a variation pipeline has no prior")
        continue
      if given[stage] is None:
        arrays[f"{stage}_latents"] = jax.random.normal(jax.random.fold_in(rng, 10 + i), shapes[stage], jnp.float32)
      else:
        value = np.asarray(given[stage], np.float32)
        if value.shape != shapes[stage]:
          raise ValueError(f"{stage}_latents has shape {value.shape}; expected {shapes[stage]}")
        arrays[f"{stage}_latents"] = value
    steps = (int(prior_num_inference_steps), int(decoder_num_inference_steps), int(super_res_num_inference_steps))
    if step_noise is not None:
      arrays["step_noise"] = {stage: np.asarray(step_noise[stage], np.float32) for stage in shapes}
    if self.is_variation:
      if pixels is not None:
        arrays["pixels"] = rep(pixels)
      else:
        arrays["image_embeds"] = rep(np.asarray(image_embeddings, np.float32))
    static = _Static(steps=steps, guided=guided, step_noise=step_noise is not None,
                     given_embeddings=self.is_variation and image_embeddings is not None)
    images = np.asarray(self._program(static)(self._states, arrays))
    return images if output_type == "float" else to_uint8(images, value_range=(0.0, 1.0))
