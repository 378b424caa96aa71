"""Sampler plumbing that text-to-image, image-to-image and inpainting pipelines share.

`samplers.make_plan` gives a whole chain from pure noise. Image-to-image starts part-way (diffusers' `strength`):
the chain's tail from step `start`, entered by noising the image's latents to that step's level with the sampler's
own forward process (diffusers' `scheduler.add_noise`). Inpainting with an ordinary U-Net re-imposes the known
region after every step, noised to the level the step lands on. Both need the forward process in each sampler's
state space, so that lives here too: x_VP for DDIM/DDPM/DPM-Solver++, x_VE = x_0 + sigma eps for the Euler family,
(1 - sigma) x_0 + sigma eps for flow matching.

`SamplerSettings` is what a pipeline keeps of a diffusers scheduler config: our sampler name, its options and the
noise schedule, plus the raw config so another sampler can be swapped in the way diffusers'
`OtherScheduler.from_config(pipe.scheduler.config)` does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import schedules as sched_lib
from diffusion_jax.diffusion.scheduler_config import sampler_from_scheduler_config

# Our sampler names and the diffusers scheduler class each reproduces; a sampler override swaps the class name.
SCHEDULER_CLASSES = {
    'ddim': 'DDIMScheduler',
    'ddpm': 'DDPMScheduler',
    'dpmpp_2m': 'DPMSolverMultistepScheduler',
    'euler': 'EulerDiscreteScheduler',
    'euler_ancestral': 'EulerAncestralDiscreteScheduler',
    'heun': 'HeunDiscreteScheduler',
    'flow_euler': 'FlowMatchEulerDiscreteScheduler',
    'unclip': 'UnCLIPScheduler',
}
# How each sampler's state relates to a clean x_0 and standard noise (see the module docstring).
_STATE_KIND = {'ddim': 'vp_t', 'ddpm': 'vp_t', 'dpmpp_2m': 'vp_sigma', 'euler': 've', 'euler_ancestral': 've',
               'heun': 've', 'flow_euler': 'flow', 'unclip': 'vp_t'}


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerSettings:
  """A sampler (name + `samplers.make_plan` options) and its noise schedule, read from a scheduler config.

  `scheduler_class` is the diffusers class the settings came from; PNDMScheduler maps to DDIM on the same time
  steps (see `diffusion.scheduler_config`). Compared by identity: pipelines key compiled programs on it.
  """
  name: str
  options: dict
  schedule: Optional[sched_lib.NoiseSchedule]
  scheduler_config: dict
  scheduler_class: str

  @classmethod
  def from_scheduler_config(cls, config: dict, sampler: Optional[str] = None, **overrides: Any) -> SamplerSettings:
    """Settings for a diffusers scheduler config dict; `sampler` (ours or a diffusers class name) replaces its class.

    The replacement keeps every field of `config` the new class takes (betas, spacing, offset, prediction type, ...)
    and gives the others the new class's defaults, as diffusers' `NewScheduler.from_pretrained(folder,
    subfolder='scheduler')` does with a saved config. (diffusers' in-memory `from_config` also drops the fields the
    old scheduler was left at its default for; a saved SD 1.x config, which omits `timestep_spacing`, gets the same
    answer both ways.) `overrides` are further config fields in diffusers' names (e.g. use_karras_sigmas=True,
    timestep_spacing='trailing').
    """
    config = dict(config, **overrides)
    if sampler is not None:
      config['_class_name'] = SCHEDULER_CLASSES.get(sampler, sampler)
    name, options, schedule = sampler_from_scheduler_config(config)
    return cls(name, options, schedule, config, config['_class_name'])

  def replace(self, sampler: Optional[str] = None, **overrides: Any) -> SamplerSettings:
    return SamplerSettings.from_scheduler_config(self.scheduler_config, sampler, **overrides)

  def plan(self, num_steps: int, eta: float = 0.0) -> samplers.Plan:
    """The full chain; `eta` reaches only the samplers that take one, as diffusers passes it only to DDIM."""
    options = dict(self.options)
    if self.name == 'ddim':
      options['eta'] = eta
    return samplers.make_plan(self.schedule, sampler=self.name, num_steps=num_steps, **options)

  @property
  def draws_noise(self) -> bool:
    return self.name in samplers.NOISY_SAMPLERS


def start_step(num_steps: int, strength: float) -> int:
  """The first step an image-to-image run takes, as diffusers' `get_timesteps`: the last strength * n steps run."""
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f'strength must be in [0, 1], got {strength}')
  run = min(int(num_steps * strength), num_steps)
  if run == 0:
    raise ValueError(f'strength={strength} with num_inference_steps={num_steps} leaves no step to run; '
                     f'raise either so that strength * steps >= 1')
  return num_steps - run


def tail(plan: samplers.Plan, start: int) -> samplers.Plan:
  """The plan's steps from `start` on. A multistep solver's first step there has no history: first order."""
  if start == 0:
    return plan
  cut = lambda a: a[start:]
  timesteps = jax.tree.map(cut, plan.timesteps)
  if isinstance(timesteps, dict) and 'order' in timesteps:
    # diffusers' DPM-Solver counts its warm-up from the first step it takes (lower_order_nums starts at 0).
    timesteps = dict(timesteps, order=jnp.asarray(timesteps['order']).at[0].set(1))
  return plan._replace(timesteps=timesteps, prev_timesteps=jax.tree.map(cut, plan.prev_timesteps))


def first_level(plan: samplers.Plan):
  """The per-step input row of the plan's first step (what `noise_to` takes as `level`)."""
  return jax.tree.map(lambda a: a[0], plan.timesteps)


def noise_to(sampler: str, schedule, x0: jax.Array, noise: jax.Array, level) -> jax.Array:
  """The sampler's state at `level` (a row of a plan's per-step inputs) for clean `x0`: diffusers' `add_noise`."""
  kind = _STATE_KIND[sampler]
  if kind == 'vp_t':
    abar = samplers.alpha_bar_at(schedule, level)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise
  sigma = level['sigma']
  if kind == 've':
    return x0 + sigma * noise
  if kind == 'vp_sigma':
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    return alpha * x0 + sigma * alpha * noise
  return (1.0 - sigma) * x0 + sigma * noise


def masked(plan: samplers.Plan, sampler: str, schedule, known: jax.Array, mask: jax.Array,
           noise: jax.Array) -> samplers.Plan:
  """The plan with diffusers' latent inpainting blend after every step (for U-Nets without mask inputs).

  Where `mask` is 0 the state is replaced by `known` (the image's latents) noised to the level the step reached,
  with the same `noise` throughout; after the last step by `known` itself, since that level may not be exactly
  clean (DDIM without set_alpha_to_one ends at alphas_cumprod[0]).
  """
  inner = plan.sampler
  num_steps = jax.tree.leaves(plan.timesteps)[0].shape[0]

  def step(model_fn, x, carry, t, t_prev, rng):
    x_prev, carry, x0 = inner.step(model_fn, x, carry, t['level'], t_prev, rng)
    target = jnp.where(t['last'], known, noise_to(sampler, schedule, known, noise, t_prev))
    return (1.0 - mask) * target + mask * x_prev, carry, x0

  return plan._replace(sampler=samplers.Sampler(inner.init, step),
                       timesteps={'level': plan.timesteps, 'last': np.arange(num_steps) == num_steps - 1})
