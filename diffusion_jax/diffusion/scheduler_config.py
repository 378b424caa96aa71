"""Reads a diffusers `scheduler/scheduler_config.json` into one of our samplers, its options and its NoiseSchedule.

    name, options, schedule = sampler_from_scheduler_config('path/to/pipeline')
    images = samplers.sample(model_fn, schedule, noise, rng, sampler=name, num_steps=30, **options)

Each supported class maps to the sampler that reproduces it step by step (tests/test_samplers.py checks each against
the scheduler saved with `save_pretrained`, tests/test_unclip_parts.py Karlo's UnCLIPScheduler), except PNDMScheduler:
its PLMS (a 4th-order linear multistep method with Runge-Kutta warm-up) has no counterpart here, so it maps to DDIM
on the same time steps (same spacing, offset and final alpha): the same probability-flow ODE solved at first order,
what `DDIMScheduler.from_config(pndm.config)` gives in diffusers. LMSDiscreteScheduler is refused for the same
reason, with no DDIM-like twin to fall back on.

A field whose value would change sampling in a way we do not implement is a one-line ValueError naming it. Fields a
class does not take are ignored, as diffusers' `from_config` ignores them (old configs carry such leftovers, e.g.
Stable Diffusion 1.5's PNDM config has `clip_sample`). Missing fields take the class's diffusers default.
"""
import json
import math
import os
from typing import Any

from diffusion_jax.diffusion import schedules as sched_lib

_BETA_SCHEDULES = {'linear': 'linear', 'scaled_linear': 'scaled_linear', 'squaredcos_cap_v2': 'cosine'}
_VP_PREDICTIONS = ('epsilon', 'v_prediction', 'sample')
_BETAS = {'num_train_timesteps': 1000, 'beta_start': 0.0001, 'beta_end': 0.02, 'beta_schedule': 'linear',
          'trained_betas': None}
_THRESHOLDING = {'thresholding': False, 'dynamic_thresholding_ratio': 0.995, 'sample_max_value': 1.0}
_SIGMA_KINDS = {'use_karras_sigmas': False, 'use_exponential_sigmas': False, 'use_beta_sigmas': False}

# Every __init__ argument of each diffusers class (0.42) with its default. A test checks these against diffusers'
# signatures, so a field added upstream must be classified here (read, refused or harmless) before it can be missed.
DEFAULTS = {
    'DDIMScheduler': dict(_BETAS, clip_sample=True, set_alpha_to_one=True, steps_offset=0, prediction_type='epsilon',
                          clip_sample_range=1.0, timestep_spacing='leading', rescale_betas_zero_snr=False,
                          **_THRESHOLDING),
    'DDPMScheduler': dict(_BETAS, variance_type='fixed_small', clip_sample=True, prediction_type='epsilon',
                          clip_sample_range=1.0, timestep_spacing='leading', steps_offset=0,
                          rescale_betas_zero_snr=False, **_THRESHOLDING),
    'PNDMScheduler': dict(_BETAS, skip_prk_steps=False, set_alpha_to_one=False, prediction_type='epsilon',
                          timestep_spacing='leading', steps_offset=0),
    'DPMSolverMultistepScheduler': dict(
        _BETAS, solver_order=2, prediction_type='epsilon', algorithm_type='dpmsolver++', solver_type='midpoint',
        lower_order_final=True, euler_at_final=False, use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0,
        final_sigmas_type='zero', lambda_min_clipped=-math.inf, variance_type=None, timestep_spacing='linspace',
        steps_offset=0, rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type='exponential',
        **_THRESHOLDING, **_SIGMA_KINDS),
    'EulerDiscreteScheduler': dict(
        _BETAS, prediction_type='epsilon', interpolation_type='linear', sigma_min=None, sigma_max=None,
        timestep_spacing='linspace', timestep_type='discrete', steps_offset=0, rescale_betas_zero_snr=False,
        final_sigmas_type='zero', **_SIGMA_KINDS),
    'EulerAncestralDiscreteScheduler': dict(_BETAS, prediction_type='epsilon', timestep_spacing='linspace',
                                            steps_offset=0, rescale_betas_zero_snr=False),
    'HeunDiscreteScheduler': dict(_BETAS, beta_start=0.00085, beta_end=0.012, prediction_type='epsilon',
                                  clip_sample=False, clip_sample_range=1.0, timestep_spacing='linspace',
                                  steps_offset=0, **_SIGMA_KINDS),
    'FlowMatchEulerDiscreteScheduler': dict(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
        time_shift_type='exponential', stochastic_sampling=False, **_SIGMA_KINDS),
    'UnCLIPScheduler': dict(num_train_timesteps=1000, variance_type='fixed_small_log', clip_sample=True,
                            clip_sample_range=1.0, prediction_type='epsilon', beta_schedule='squaredcos_cap_v2'),
}
_REFUSED = {
    'LMSDiscreteScheduler': 'its linear multistep solver has no equivalent here; use EulerDiscreteScheduler or '
                            'DPMSolverMultistepScheduler with the same betas',
}


class _Fields:
  """A config's values with the class defaults behind them, and the one-line error for an unsupported one."""

  def __init__(self, raw: dict, class_name: str):
    self.raw, self.name, self.defaults = raw, class_name, DEFAULTS[class_name]

  def __getitem__(self, field: str):
    return self.raw.get(field, self.defaults[field])

  def require(self, field: str, *allowed):
    value = self[field]
    if value not in allowed:
      raise ValueError(f'{self.name}: unsupported {field}={value!r}; supported: {", ".join(map(repr, allowed))}')
    return value

  def off(self, *fields):
    """Fields whose default (off / none) is the only value we implement."""
    for field in fields:
      self.require(field, self.defaults[field])


def _load(path_or_dict) -> dict:
  if isinstance(path_or_dict, dict):
    return dict(path_or_dict)
  path = os.fspath(path_or_dict)
  if os.path.isdir(path):
    nested = os.path.join(path, 'scheduler', 'scheduler_config.json')
    path = nested if os.path.exists(nested) else os.path.join(path, 'scheduler_config.json')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _schedule(f: _Fields) -> sched_lib.NoiseSchedule:
  if 'rescale_betas_zero_snr' in f.defaults:
    f.off('rescale_betas_zero_snr')  # a terminal alpha_bar of 0 makes sigma_max infinite
  if f['trained_betas'] is not None:
    return sched_lib.NoiseSchedule.from_betas(f['trained_betas'])
  kind = _BETA_SCHEDULES.get(f['beta_schedule'])
  if kind is None:
    f.require('beta_schedule', *_BETA_SCHEDULES)
  return sched_lib.NoiseSchedule.create(kind, int(f['num_train_timesteps']), float(f['beta_start']),
                                        float(f['beta_end']))


def _clip(f: _Fields) -> bool:
  if f['clip_sample']:
    f.require('clip_sample_range', 1.0)
  return bool(f['clip_sample'])


def _spacing(f: _Fields) -> dict:
  return {'timestep_spacing': f.require('timestep_spacing', 'leading', 'trailing', 'linspace'),
          'steps_offset': int(f['steps_offset'])}


def sampler_from_scheduler_config(path_or_dict) -> tuple[str, dict[str, Any], sched_lib.NoiseSchedule | None]:
  """(sampler name, keyword options of `samplers.sample`, NoiseSchedule) for a diffusers scheduler config.

  `path_or_dict` is a loaded config, a `scheduler_config.json`, its folder, or a pipeline folder holding
  `scheduler/`. The schedule is None for FlowMatchEulerDiscreteScheduler, whose flow needs none.
  """
  raw = _load(path_or_dict)
  name = raw.get('_class_name')
  if name in _REFUSED:
    raise ValueError(f'unsupported _class_name={name!r}: {_REFUSED[name]}')
  if name not in DEFAULTS:
    raise ValueError(f'unsupported _class_name={name!r}; supported: {", ".join(DEFAULTS)}')
  f = _Fields(raw, name)

  if name == 'FlowMatchEulerDiscreteScheduler':
    # base/max shift and image sequence lengths only matter with dynamic shifting, refused here.
    f.off('use_dynamic_shifting', 'invert_sigmas', 'shift_terminal', 'stochastic_sampling', 'use_exponential_sigmas',
          'use_beta_sigmas')
    return 'flow_euler', {'prediction_type': 'flow_prediction', 'clip_x0': False, 'shift': float(f['shift']),
                          'num_train_timesteps': int(f['num_train_timesteps']),
                          'use_karras_sigmas': bool(f['use_karras_sigmas'])}, None

  if name == 'UnCLIPScheduler':
    # Its own time steps and no spacing options; the cosine betas are the only ones it builds.
    f.require('beta_schedule', 'squaredcos_cap_v2')
    schedule = sched_lib.NoiseSchedule.create('cosine', int(f['num_train_timesteps']))
    return 'unclip', {'prediction_type': f.require('prediction_type', 'epsilon', 'sample'),
                      'variance_type': f.require('variance_type', 'fixed_small_log', 'learned_range'),
                      'clip_x0': bool(f['clip_sample']),
                      'clip_x0_range': float(f['clip_sample_range'])}, schedule

  schedule = _schedule(f)
  options = {'prediction_type': f.require('prediction_type', *_VP_PREDICTIONS), **_spacing(f)}
  if 'thresholding' in f.defaults:
    f.off('thresholding')  # dynamic_thresholding_ratio and sample_max_value only act with it

  if name == 'DDIMScheduler':
    return 'ddim', dict(options, clip_x0=_clip(f), set_alpha_to_one=bool(f['set_alpha_to_one'])), schedule
  if name == 'DDPMScheduler':
    # fixed_small_log is the same variance, taken through its log.
    f.require('variance_type', 'fixed_small', 'fixed_small_log')
    return 'ddpm', dict(options, clip_x0=_clip(f)), schedule
  if name == 'PNDMScheduler':
    # skip_prk_steps only picks PLMS's warm-up; PNDM never clips.
    return 'ddim', dict(options, clip_x0=False, set_alpha_to_one=bool(f['set_alpha_to_one'])), schedule
  if name == 'DPMSolverMultistepScheduler':
    f.require('solver_order', 2)
    f.require('algorithm_type', 'dpmsolver++')
    f.require('solver_type', 'midpoint')
    f.require('lower_order_final', True)
    # flow_shift and time_shift_type only act with flow sigmas / dynamic shifting, refused here.
    f.off('euler_at_final', 'use_exponential_sigmas', 'use_beta_sigmas', 'use_lu_lambdas', 'use_flow_sigmas',
          'lambda_min_clipped', 'variance_type', 'use_dynamic_shifting')
    return 'dpmpp_2m', dict(options, clip_x0=False, use_karras_sigmas=bool(f['use_karras_sigmas']),
                            final_sigmas_type=f.require('final_sigmas_type', 'zero', 'sigma_min')), schedule
  if name == 'EulerDiscreteScheduler':
    f.require('interpolation_type', 'linear')
    f.require('timestep_type', 'discrete')
    f.off('use_exponential_sigmas', 'use_beta_sigmas', 'sigma_min', 'sigma_max')
    return 'euler', dict(options, clip_x0=False, use_karras_sigmas=bool(f['use_karras_sigmas']),
                         final_sigmas_type=f.require('final_sigmas_type', 'zero', 'sigma_min')), schedule
  if name == 'EulerAncestralDiscreteScheduler':
    return 'euler_ancestral', dict(options, clip_x0=False), schedule
  # HeunDiscreteScheduler
  f.off('use_exponential_sigmas', 'use_beta_sigmas')
  return 'heun', dict(options, clip_x0=_clip(f), use_karras_sigmas=bool(f['use_karras_sigmas'])), schedule
