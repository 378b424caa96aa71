"""Stable Diffusion 1.x/2.x: text-to-image, image-to-image and inpainting, each call one compiled program.

  from diffusion_jax import pretrained
  pipe = pretrained.load_pipeline('path/to/stable-diffusion')   # a diffusers save_pretrained folder
  images = pipe(['a photo of a cat'], num_inference_steps=30, guidance_scale=7.5, seed=0)  # uint8 [B, H, W, 3]
  images = pipe.img2img(['a watercolour of a cat'], photo, strength=0.75)
  images = pipe.inpaint(['a dog'], photo, mask, strength=1.0)

Text encoding, every denoising step (conditional and unconditional halves in one U-Net batch) and the VAE decode
(and for image inputs the VAE encode) run in one `jax.jit` program: no Python and no host round trip between
steps, which is where a diffusers pipeline spends much of its time on small models or fast accelerators. Programs
are cached per static setting (mode, steps, strength, guidance on/off, ...) and, inside `jax.jit`, per input
shape; the guidance scale and the seed are traced, so changing them does not recompile. Only tokenization and
input conversion run on the host.

Semantics follow diffusers' StableDiffusion{,Img2Img,Inpaint}Pipeline so that the same weights, scheduler config
and initial latents give the same images: latents scaled by the VAE's scaling factor, initial noise multiplied by
the sampler's init sigma, time steps as the scheduler config spaces them, guidance uncond + s (cond - uncond)
only when s > 1, an empty negative prompt by default, posterior samples (not means) of the VAE encoder for image
inputs, `strength` choosing the last int(strength * steps) steps, and the inpainting mask binarised at 0.5 and
taken at latent resolution by nearest neighbour. Random draws use JAX's generator, so only `latents` (the initial
standard normal noise, NHWC) is shared with a diffusers run; everything else is deterministic given it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.diffusion import samplers
from diffusion_jax.pipelines.images import to_uint8
from diffusion_jax.pipelines import images as image_io
from diffusion_jax.pipelines import latent_chain
from diffusion_jax.pipelines.latent_chain import SamplerSettings

Prompts = Union[str, Sequence[str]]


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything a program is specialised on besides input shapes; one compiled program per distinct value."""
  mode: str  # 'text', 'img2img' or 'inpaint'
  num_steps: int
  start: int  # the first step of the chain that runs (image inputs with strength < 1)
  from_noise: bool  # the chain starts at pure noise (text-to-image; inpainting at strength 1)
  guided: bool
  guidance_rescale: float
  clip_skip: int
  eta: float
  latent_shape: tuple  # [B, h, w, C]; needed to draw noise when no latents are given
  given_noise: bool


class StableDiffusionPipeline:
  """A CLIP text encoder, a U-Net and a VAE with a tokenizer and a sampler; see the module docstring.

  The modules are NNX modules. Their parameters are captured at construction (reading an NNX state costs tens of
  milliseconds per call, a third of a small model's whole generation); after editing them in place, call
  `refresh()`.
  `max_length` is the tokenizer's padded length (diffusers' `tokenizer.model_max_length`); `default_size` the
  image side used when height/width are not given (diffusers: unet sample_size * VAE factor).
  """

  def __init__(self, text_encoder: nnx.Module, unet: nnx.Module, vae: nnx.Module, tokenizer,
               sampler: SamplerSettings, *, max_length: Optional[int] = None, default_size: Optional[int] = None):
    self.text_encoder, self.unet, self.vae, self.tokenizer, self.sampler = text_encoder, unet, vae, tokenizer, sampler
    context = text_encoder.config.context_length
    self.max_length = int(max_length or context)
    if self.max_length > context:
      raise ValueError(f'tokenizer length {self.max_length} exceeds the text encoder\'s {context} positions')
    self.vae_scale_factor = vae.config.downsample_factor
    self.default_size = int(default_size or 64 * self.vae_scale_factor)
    channels = vae.config.latent_channels
    if unet.config.in_channels not in (channels, 2 * channels + 1):
      raise ValueError(f'U-Net in_channels={unet.config.in_channels} fits neither {channels} latent channels nor '
                       f'an inpainting U-Net ({2 * channels + 1}: latents, mask, masked-image latents)')
    self._graphdefs = tuple(nnx.graphdef(m) for m in self._modules())
    self.refresh()
    self._programs: dict[_Static, Any] = {}
    self.trace_count = 0  # programs traced so far: tests check a repeated call adds none

  def _modules(self):
    return self.text_encoder, self.unet, self.vae

  def refresh(self) -> None:
    """Re-reads the modules' parameters (after an in-place edit); compiled programs stay valid."""
    self._states = tuple(nnx.state(m) for m in self._modules())

  @property
  def is_inpainting_unet(self) -> bool:
    return self.unet.config.in_channels != self.vae.config.latent_channels

  def with_sampler(self, sampler: Optional[str] = None, **overrides: Any) -> StableDiffusionPipeline:
    """The same models with another sampler (ours or a diffusers scheduler class name) or scheduler fields.

    As diffusers' `pipe.scheduler = OtherScheduler.from_config(pipe.scheduler.config)`: betas, spacing and
    prediction type carry over. Compiled programs are not shared with the new pipeline.
    """
    return StableDiffusionPipeline(self.text_encoder, self.unet, self.vae, self.tokenizer,
                                   self.sampler.replace(sampler, **overrides), max_length=self.max_length,
                                   default_size=self.default_size)

  # ------------------------------------------------------------------------------------------- public calls

  def __call__(self, prompts: Prompts, num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
               height: Optional[int] = None, width: Optional[int] = None, latents=None,
               negative_prompt: Optional[Prompts] = None, *, guidance_rescale: float = 0.0, clip_skip: int = 0,
               eta: float = 0.0, output_type: str = 'uint8') -> np.ndarray:
    """Text-to-image: images [B, H, W, 3], uint8 (or float in [0, 1] with output_type='float').

    `latents` [B, H/8, W/8, 4] is the standard normal initial noise (diffusers' `latents`); drawn from `seed` when
    None. `clip_skip` k conditions on the k-th last layer's states (final-normed, as diffusers); `eta` is DDIM's.
    """
    return self._generate('text', prompts, num_inference_steps, guidance_scale, seed, height, width, latents,
                          negative_prompt, None, None, 1.0, guidance_rescale, clip_skip, eta, output_type)

  def img2img(self, prompts: Prompts, image, strength: float = 0.8, num_inference_steps: int = 50,
              guidance_scale: float = 7.5, seed: int = 0, latents=None, negative_prompt: Optional[Prompts] = None,
              *, guidance_rescale: float = 0.0, clip_skip: int = 0, eta: float = 0.0,
              output_type: str = 'uint8') -> np.ndarray:
    """Image-to-image: `image` (uint8 or float [0, 1], [H, W, 3] or [B, H, W, 3]) noised to step
    (1 - strength) * steps of the chain, then denoised for the remaining steps.

    `latents` is the standard normal noise added to the image's latents (drawn from `seed` when None).
    """
    return self._generate('img2img', prompts, num_inference_steps, guidance_scale, seed, None, None, latents,
                          negative_prompt, image, None, strength, guidance_rescale, clip_skip, eta, output_type)

  def inpaint(self, prompts: Prompts, image, mask, strength: float = 1.0, num_inference_steps: int = 50,
              guidance_scale: float = 7.5, seed: int = 0, latents=None, negative_prompt: Optional[Prompts] = None,
              *, guidance_rescale: float = 0.0, clip_skip: int = 0, eta: float = 0.0,
              output_type: str = 'uint8') -> np.ndarray:
    """Repaints where `mask` is white (>= 0.5; [H, W], [B, H, W] or [B, H, W, 1], same size as `image`).

    An inpainting U-Net (9 input channels) gets the mask and the masked image's latents as inputs; any other
    U-Net is steered by re-imposing the known region's latents, noised to the current level, after every step.
    At strength 1 the chain starts from pure noise (`latents` times the init sigma, as diffusers); below 1 from
    the image's latents noised with `latents`.
    """
    return self._generate('inpaint', prompts, num_inference_steps, guidance_scale, seed, None, None, latents,
                          negative_prompt, image, mask, strength, guidance_rescale, clip_skip, eta, output_type)

  # ------------------------------------------------------------------------------------------- host side

  def _token_ids(self, prompts: list[str], negative_prompt: Optional[Prompts], guided: bool) -> np.ndarray:
    ids = self.tokenizer(prompts, self.max_length)
    if not guided:
      return ids
    if negative_prompt is None:
      negative = [''] * len(prompts)
    elif isinstance(negative_prompt, str):
      negative = [negative_prompt] * len(prompts)
    else:
      negative = list(negative_prompt)
      if len(negative) != len(prompts):
        raise ValueError(f'{len(negative)} negative prompts for {len(prompts)} prompts')
    # Conditional half first: the order `samplers.classifier_free_guidance` splits the U-Net batch in.
    return np.concatenate([ids, self.tokenizer(negative, self.max_length)])

  def _generate(self, mode, prompts, num_steps, guidance_scale, seed, height, width, latents, negative_prompt,
                image, mask, strength, guidance_rescale, clip_skip, eta, output_type):
    if output_type not in ('uint8', 'float'):
      raise ValueError(f"output_type must be 'uint8' or 'float', got {output_type!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise ValueError('prompts must be a string or a non-empty list of strings')
    if not isinstance(num_steps, int) or num_steps < 1:
      raise ValueError(f'num_inference_steps must be a positive int, got {num_steps!r}')
    if self.is_inpainting_unet and mode != 'inpaint':
      raise ValueError('this U-Net is an inpainting U-Net (mask and masked-image inputs): use inpaint()')
    batch = len(prompts)
    f = self.vae_scale_factor
    if image is not None:
      image = image_io.image_input(image, batch)
      height, width = image.shape[1:3]
    height, width = height or self.default_size, width or self.default_size
    image_io.check_size(height, width, f)
    if mask is not None:
      mask = image_io.mask_input(mask, batch, (height, width))
    latent_shape = (batch, height // f, width // f, self.vae.config.latent_channels)
    if latents is not None:
      latents = np.asarray(latents, np.float32)
      if latents.shape != latent_shape:
        raise ValueError(f'latents must be NHWC {latent_shape} for {batch} prompts at {height}x{width}; '
                         f'got {latents.shape}')
    guided = guidance_scale > 1.0  # diffusers' do_classifier_free_guidance
    start = 0 if mode == 'text' else latent_chain.start_step(num_steps, strength)
    static = _Static(mode=mode, num_steps=num_steps, start=start,
                     from_noise=mode == 'text' or (mode == 'inpaint' and strength == 1.0), guided=guided,
                     guidance_rescale=float(guidance_rescale), clip_skip=int(clip_skip), eta=float(eta),
                     latent_shape=latent_shape, given_noise=latents is not None)
    ids = self._token_ids(prompts, negative_prompt, guided)
    out = self._program(static)(self._states, ids, latents, np.uint32(seed % 2**32), np.float32(guidance_scale), image,
                                mask)
    out = np.asarray(out)  # the one device -> host transfer
    return to_uint8(out, value_range=(0.0, 1.0)) if output_type == 'uint8' else out

  def _program(self, static: _Static):
    fn = self._programs.get(static)
    if fn is None:
      fn = self._programs[static] = jax.jit(functools.partial(self._trace, static))
    return fn

  # ------------------------------------------------------------------------------------------- the program

  def _trace(self, s: _Static, states, ids, noise, seed, guidance_scale, image, mask):
    self.trace_count += 1
    text_encoder, unet, vae = (nnx.merge(g, st) for g, st in zip(self._graphdefs, states))
    sampler, schedule = self.sampler.name, self.sampler.schedule
    k_encode, k_noise, k_chain = jax.random.split(jax.random.key(seed), 3)
    context = text_encoder(ids, skip_last_layers=s.clip_skip)

    # Latents of the image inputs, through one encoder batch: the image's (the chain's start below strength 1, the
    # known region for blending) and the masked image's (an inpainting U-Net's input).
    nine = self.is_inpainting_unet
    need_known = not s.from_noise or (s.mode == 'inpaint' and not nine)
    pixels = []
    if need_known:
      pixels.append(image)
    if nine:
      pixels.append(image * (mask < 0.5))
    encoded = []
    if pixels:
      posterior = vae.encode(jnp.concatenate(pixels))
      encoded = jnp.split(vae.scale_latents(posterior.sample(k_encode)), len(pixels))
    known = encoded[0] if need_known else None
    mask_latent = None if mask is None else mask[:, ::self.vae_scale_factor, ::self.vae_scale_factor]

    if noise is None:
      noise = jax.random.normal(k_noise, s.latent_shape, jnp.float32)
    plan = latent_chain.tail(self.sampler.plan(s.num_steps, s.eta), s.start)
    if s.from_noise:
      x = (noise * plan.noise_scale).astype(noise.dtype)
    else:
      x = latent_chain.noise_to(sampler, schedule, known, noise, latent_chain.first_level(plan)).astype(noise.dtype)
    if s.mode == 'inpaint' and not nine:
      plan = latent_chain.masked(plan, sampler, schedule, known, mask_latent, noise)

    extra = None
    if nine:  # diffusers' order: latents, mask, masked-image latents
      extra = jnp.concatenate([mask_latent, encoded[-1]], axis=-1)
      if s.guided:
        extra = jnp.concatenate([extra, extra])

    def unet_fn(x, t):
      if extra is not None:
        x = jnp.concatenate([x, extra.astype(x.dtype)], axis=-1)
      return unet(x, t, context)

    model_fn = (samplers.classifier_free_guidance(unet_fn, guidance_scale, s.guidance_rescale) if s.guided
                else unet_fn)
    latents = samplers.run_chain(plan.sampler, model_fn, x, plan.timesteps, plan.prev_timesteps, k_chain)
    decoded = vae.decode(vae.unscale_latents(latents))
    return jnp.clip(decoded.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)
