"""The sampler family against diffusers' schedulers step by step, scheduler configs, and the flow-matching objective.

Parity runs diffusers' documented loop (set_timesteps, init_noise_sigma, scale_model_input, step) with the same toy
"model" written in torch and JAX, and compares every intermediate state: max |ours - theirs| over max |theirs| per
step, at most 1e-5. diffusers' loop runs the model and the state in float64 (its sigma tables stay float32): its own
float32 state rounding would otherwise be the larger error (e.g. Euler's first step from the cosine schedule's sigma
of 2e4 cancels x against itself and keeps ~3 digits in float32, in diffusers and in any faithful copy alike).
"""
import functools
import inspect

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_jax.diffusion import flow, samplers, scheduler_config, schedules

T = 1000
SHAPE = (2, 4, 4, 3)  # NHWC
TOL = 1e-5
KINDS = {  # ours: (diffusers' name, beta_start, beta_end)
    'linear': ('linear', 1e-4, 2e-2),
    'scaled_linear': ('scaled_linear', 8.5e-4, 1.2e-2),
    'cosine': ('squaredcos_cap_v2', 1e-4, 2e-2),
}
SCHEDULERS = {
    'ddim': diffusers.DDIMScheduler,
    'ddpm': diffusers.DDPMScheduler,
    'dpmpp_2m': diffusers.DPMSolverMultistepScheduler,
    'euler': diffusers.EulerDiscreteScheduler,
    'euler_ancestral': diffusers.EulerAncestralDiscreteScheduler,
    'heun': diffusers.HeunDiscreteScheduler,
    'flow_euler': diffusers.FlowMatchEulerDiscreteScheduler,
}


def _key(seed):
  return jax.random.key(seed, impl='rbg')  # compiles faster on XLA:CPU than threefry; see test_diffusion.py


def _normal(seed, shape=SHAPE):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _schedule(kind):
  _, beta_start, beta_end = KINDS[kind]
  return schedules.NoiseSchedule.create(kind, T, beta_start, beta_end)


class ToyModel:
  """A near-identity channel mix with a time-dependent gain and bias: cheap, deterministic, float t welcome."""

  def __init__(self, seed=0, channels=SHAPE[-1]):
    rng = np.random.default_rng(seed)
    self.w = (np.eye(channels) + 0.1 * rng.standard_normal((channels, channels))).astype(np.float32)
    self.b = (0.1 * rng.standard_normal(channels)).astype(np.float32)

  def jax(self, x, t):
    t = t.astype(jnp.float32)[:, None, None, None]
    return jnp.einsum('bhwc,cd->bhwd', x, self.w) * (0.95 + 0.05 * jnp.cos(t / 300)) + self.b * jnp.sin(t / 100)

  def torch(self, x, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    mixed = torch.einsum('bhwc,cd->bhwd', x, torch.from_numpy(self.w).double())
    return mixed * (0.95 + 0.05 * torch.cos(t / 300)) + torch.from_numpy(self.b).double() * torch.sin(t / 100)


def _reference(scheduler, model, noise, num_steps):
  """diffusers' sampling loop; the state after every completed step (Heun's corrector halves and its last step)."""
  scheduler.set_timesteps(num_steps)
  x = torch.from_numpy(noise).double() * getattr(scheduler, 'init_noise_sigma', 1.0)
  states = []
  for t in scheduler.timesteps:
    model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, 'scale_model_input') else x
    x = scheduler.step(model.torch(model_in, t), t, x).prev_sample
    states.append(x.numpy())
  if isinstance(scheduler, diffusers.HeunDiscreteScheduler):
    states = states[1::2] + states[-1:]
  return np.stack(states)


def _relative_error(ours, theirs):
  assert ours.shape == theirs.shape
  return max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(np.asarray(ours, np.float64), theirs))


def _replay(monkeypatch, module, rng, num_steps):
  """Makes diffusers draw, in order, the noise our sampler draws at each step (key i of split(rng, num_steps))."""
  draws = [np.array(jax.random.normal(k, SHAPE, jnp.float32)) for k in jax.random.split(rng, num_steps)]

  def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
    del generator, device, kwargs
    noise = draws.pop(0)
    assert tuple(shape) == noise.shape
    return torch.from_numpy(noise).to(dtype)

  monkeypatch.setattr(module, 'randn_tensor', randn_tensor)


# ---------------------------------------------------------------------------------------------------- parity

PARITY = [  # sampler, schedule, prediction type, steps, options (our names; diffusers' config takes the same)
    ('dpmpp_2m', 'scaled_linear', 'epsilon', 5, {}),
    ('dpmpp_2m', 'scaled_linear', 'epsilon', 10, {'use_karras_sigmas': True}),
    ('dpmpp_2m', 'scaled_linear', 'v_prediction', 25, {'timestep_spacing': 'trailing'}),
    ('dpmpp_2m', 'scaled_linear', 'v_prediction', 5, {'use_karras_sigmas': True, 'timestep_spacing': 'linspace'}),
    ('dpmpp_2m', 'linear', 'epsilon', 25, {'use_karras_sigmas': True, 'timestep_spacing': 'linspace'}),
    ('dpmpp_2m', 'linear', 'v_prediction', 10, {'timestep_spacing': 'linspace'}),
    ('dpmpp_2m', 'linear', 'sample', 10, {'steps_offset': 1}),
    ('dpmpp_2m', 'cosine', 'epsilon', 10, {'timestep_spacing': 'trailing'}),
    ('dpmpp_2m', 'cosine', 'v_prediction', 5, {'timestep_spacing': 'linspace'}),
    # >= 15 steps ending at sigma_min: the last step is second order too.
    ('dpmpp_2m', 'scaled_linear', 'epsilon', 25, {'final_sigmas_type': 'sigma_min'}),
    ('dpmpp_2m', 'scaled_linear', 'v_prediction', 10, {'final_sigmas_type': 'sigma_min', 'use_karras_sigmas': True}),
    ('euler', 'scaled_linear', 'epsilon', 5, {}),
    ('euler', 'scaled_linear', 'epsilon', 10, {'use_karras_sigmas': True, 'timestep_spacing': 'linspace'}),
    ('euler', 'scaled_linear', 'v_prediction', 25, {'timestep_spacing': 'trailing'}),
    ('euler', 'linear', 'v_prediction', 5, {'use_karras_sigmas': True, 'timestep_spacing': 'linspace'}),
    ('euler', 'linear', 'sample', 10, {'timestep_spacing': 'linspace'}),
    ('euler', 'linear', 'epsilon', 25, {'steps_offset': 1}),
    ('euler', 'cosine', 'epsilon', 10, {}),
    ('euler', 'cosine', 'v_prediction', 5, {'use_karras_sigmas': True, 'timestep_spacing': 'linspace'}),
    ('euler', 'scaled_linear', 'epsilon', 10, {'final_sigmas_type': 'sigma_min'}),
    ('euler', 'scaled_linear', 'v_prediction', 10, {'final_sigmas_type': 'sigma_min', 'use_karras_sigmas': True}),
    ('heun', 'scaled_linear', 'epsilon', 1, {}),
    ('heun', 'scaled_linear', 'epsilon', 5, {}),
    ('heun', 'scaled_linear', 'v_prediction', 10, {'use_karras_sigmas': True, 'timestep_spacing': 'linspace'}),
    ('heun', 'linear', 'sample', 10, {'timestep_spacing': 'linspace'}),
    ('heun', 'linear', 'epsilon', 25, {'use_karras_sigmas': True, 'timestep_spacing': 'trailing'}),
    ('heun', 'cosine', 'v_prediction', 10, {}),
    ('euler_ancestral', 'scaled_linear', 'epsilon', 5, {'timestep_spacing': 'linspace'}),
    ('euler_ancestral', 'linear', 'v_prediction', 10, {}),
    ('euler_ancestral', 'cosine', 'epsilon', 10, {}),
    ('euler_ancestral', 'scaled_linear', 'v_prediction', 25, {'timestep_spacing': 'trailing'}),
    ('flow_euler', None, 'flow_prediction', 5, {}),
    ('flow_euler', None, 'flow_prediction', 10, {'shift': 3.0}),
    ('flow_euler', None, 'flow_prediction', 25, {'shift': 3.0, 'use_karras_sigmas': True}),
    ('flow_euler', None, 'flow_prediction', 10, {'use_karras_sigmas': True}),
]


def _diffusers_scheduler(sampler, kind, prediction_type, options):
  if sampler == 'flow_euler':
    return SCHEDULERS[sampler](num_train_timesteps=T, **options)
  name, beta_start, beta_end = KINDS[kind]
  return SCHEDULERS[sampler](num_train_timesteps=T, beta_schedule=name, beta_start=beta_start, beta_end=beta_end,
                             prediction_type=prediction_type,
                             **dict({'timestep_spacing': 'leading'}, **options))


@pytest.mark.parametrize('sampler,kind,prediction_type,num_steps,options', PARITY,
                         ids=[f'{s}-{k}-{p}-{n}-{"-".join(f"{a}={b}" for a, b in o.items())}'
                              for s, k, p, n, o in PARITY])
def test_sampler_matches_diffusers_every_step(monkeypatch, sampler, kind, prediction_type, num_steps, options):
  model, noise, rng = ToyModel(), _normal(1), _key(2)
  if sampler == 'euler_ancestral':
    _replay(monkeypatch, diffusers.schedulers.scheduling_euler_ancestral_discrete, rng, num_steps)
  theirs = _reference(_diffusers_scheduler(sampler, kind, prediction_type, options), model, noise, num_steps)
  schedule = None if kind is None else _schedule(kind)
  x, trajectory = samplers.sample(model.jax, schedule, jnp.asarray(noise), rng, sampler=sampler,
                                  num_steps=num_steps, prediction_type=prediction_type, clip_x0=False,
                                  return_trajectory=True, **options)
  assert _relative_error(trajectory['x'], theirs) <= TOL
  np.testing.assert_array_equal(x, trajectory['x'][-1])
  assert trajectory['x0_pred'].shape == (num_steps,) + SHAPE


def test_heun_reports_the_corrector_x0_and_clips_like_diffusers():
  model, noise, num_steps = ToyModel(seed=3), _normal(4), 6
  ref = diffusers.HeunDiscreteScheduler(num_train_timesteps=T, beta_schedule='scaled_linear', beta_start=8.5e-4,
                                        beta_end=1.2e-2, timestep_spacing='leading', clip_sample=True)
  ref.set_timesteps(num_steps)
  x = torch.from_numpy(noise).double() * ref.init_noise_sigma
  x0s = []
  for t in ref.timesteps:
    out = ref.step(model.torch(ref.scale_model_input(x, t), t), t, x)
    x = out.prev_sample
    x0s.append(out.pred_original_sample.numpy())
  _, trajectory = samplers.sample(model.jax, _schedule('scaled_linear'), jnp.asarray(noise), None, sampler='heun',
                                  num_steps=num_steps, clip_x0=True, return_trajectory=True)
  theirs = np.stack(x0s[1::2] + x0s[-1:])
  assert np.abs(theirs).max() == pytest.approx(1.0)  # clipping was exercised
  np.testing.assert_allclose(trajectory['x0_pred'], theirs, atol=1e-5)
  np.testing.assert_allclose(trajectory['x'][-1], x.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- one program

def _count_scans(jaxpr):
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == 'scan'
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _count_scans(sub)
  return count


COMPILED = [  # sampler, prediction type, options: one of each, with the traced-schedule (jnp) tables
    ('dpmpp_2m', 'v_prediction', {'timestep_spacing': 'trailing'}),
    ('euler', 'epsilon', {'use_karras_sigmas': True}),
    ('euler_ancestral', 'epsilon', {}),
    ('heun', 'v_prediction', {'use_karras_sigmas': True, 'timestep_spacing': 'linspace'}),
    ('flow_euler', 'flow_prediction', {'shift': 3.0}),
]


@pytest.mark.parametrize('sampler,prediction_type,options', COMPILED, ids=[c[0] for c in COMPILED])
def test_sampler_is_one_scan_composes_with_guidance_and_takes_a_traced_schedule(sampler, prediction_type, options):
  cond, uncond = ToyModel(seed=6), ToyModel(seed=7)
  calls = []

  def batched(x, t):
    calls.append(x.shape[0])
    half = x.shape[0] // 2
    return jnp.concatenate([cond.jax(x[:half], t[:half]), uncond.jax(x[half:], t[half:])])

  guided = samplers.classifier_free_guidance(batched, 3.0, guidance_rescale=0.5)
  run = functools.partial(samplers.sample, guided, num_steps=8, sampler=sampler, prediction_type=prediction_type,
                          **options)
  noise, rng = jnp.asarray(_normal(8)), _key(9)
  schedule = None if sampler == 'flow_euler' else _schedule('scaled_linear')
  traced = jax.jit(lambda sched, noise, rng: run(sched, noise, rng))
  jaxpr = jax.make_jaxpr(lambda sched, noise, rng: run(sched, noise, rng))(schedule, noise, rng).jaxpr
  assert _count_scans(jaxpr) == 1
  assert len(calls) == (2 if sampler == 'heun' else 1)  # traced inside the scan body, not once per step
  # Guidance is just another model_fn: the same combination written out by hand gives the same samples.
  explicit = samplers.classifier_free_guidance(
      lambda x, t: jnp.concatenate([cond.jax(x[:SHAPE[0]], t[:SHAPE[0]]), uncond.jax(x[SHAPE[0]:], t[SHAPE[0]:])]),
      3.0, guidance_rescale=0.5)
  concrete = samplers.sample(explicit, schedule, noise, rng, num_steps=8, sampler=sampler,
                             prediction_type=prediction_type, **options)
  # Traced schedules build the tables in float32 jnp instead of float64 numpy.
  assert _relative_error(traced(schedule, noise, rng)[None], np.asarray(concrete, np.float64)[None]) < 2e-5


def test_sampler_options_are_checked():
  model, noise, schedule = ToyModel(), jnp.asarray(_normal(0)), _schedule('linear')
  with pytest.raises(ValueError, match="'ddim' does not take use_karras_sigmas=True"):
    samplers.sample(model.jax, schedule, noise, None, use_karras_sigmas=True)
  with pytest.raises(ValueError, match="'heun' does not take final_sigmas_type='sigma_min'"):
    samplers.sample(model.jax, schedule, noise, None, sampler='heun', final_sigmas_type='sigma_min')
  with pytest.raises(ValueError, match="'flow_euler' does not take timestep_spacing='linspace'"):
    samplers.sample(model.jax, None, noise, None, sampler='flow_euler', prediction_type='flow_prediction',
                    timestep_spacing='linspace')
  with pytest.raises(ValueError, match="takes prediction_type in \\('flow_prediction',\\)"):
    samplers.sample(model.jax, None, noise, None, sampler='flow_euler')
  with pytest.raises(ValueError, match='flow_prediction'):
    samplers.sample(model.jax, schedule, noise, None, sampler='euler', prediction_type='flow_prediction')
  with pytest.raises(ValueError, match="'euler_ancestral' draws noise and needs an rng"):
    samplers.sample(model.jax, schedule, noise, None, sampler='euler_ancestral')
  with pytest.raises(ValueError, match="'dpmpp_2m' needs a NoiseSchedule"):
    samplers.sample(model.jax, None, noise, None, sampler='dpmpp_2m')
  with pytest.raises(ValueError, match='final_sigmas_type'):
    samplers.sample(model.jax, schedule, noise, None, sampler='euler', final_sigmas_type='one')
  with pytest.raises(ValueError, match="unknown sampler 'lms'"):
    samplers.sample(model.jax, schedule, noise, None, sampler='lms')


# ---------------------------------------------------------------------------------------------------- convergence


def test_solvers_converge_to_the_probability_flow_at_their_order():
  # For data ~ N(mu, s^2), in the VE form x = x_0 + sigma eps the probability-flow ODE is a rescaling about mu by
  # sqrt(s^2 + sigma^2). The 'sample' model below is that Gaussian's exact denoiser at the sigma diffusers assigns to
  # (possibly fractional) t, so each solver's error must shrink at its order, here measured down to sigma = 0.5,
  # beyond which linear-in-t spacing stops refining log sigma. A faithful diffusers copy with a wrong bridge to our
  # x_VP models would not converge at all.
  mu, s = 0.3, 0.5
  schedule = _schedule('scaled_linear')
  train_sigmas = jnp.sqrt((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod)
  noise = _normal(4, (256, 1))

  def denoiser(x, t):
    a = 1 / (jnp.interp(t.astype(jnp.float32), jnp.arange(T), train_sigmas)[:, None] ** 2 + 1)
    return mu + jnp.sqrt(a) * s**2 * (x - jnp.sqrt(a) * mu) / (a * s**2 + 1 - a)

  errors = {}
  for sampler in ('euler', 'heun', 'dpmpp_2m'):
    for num_steps in (10, 40):
      options = dict(sampler=sampler, num_steps=num_steps, prediction_type='sample', timestep_spacing='linspace')
      plan = samplers.make_plan(schedule, **options)
      _, trajectory = samplers.sample(denoiser, schedule, jnp.asarray(noise), None, return_trajectory=True, **options)
      sigmas = np.asarray(plan.prev_timesteps['sigma'], np.float64)
      to_ve = np.sqrt(sigmas**2 + 1)[:, None, None] if sampler == 'dpmpp_2m' else 1.0  # its state is x_VP
      ve = np.asarray(trajectory['x'], np.float64) * to_ve
      sigma0 = float(plan.timesteps['sigma'][0])
      ve0 = noise * float(plan.noise_scale) * (np.sqrt(sigma0**2 + 1) if sampler == 'dpmpp_2m' else 1.0)
      exact = mu + np.sqrt((s**2 + sigmas**2) / (s**2 + sigma0**2))[:, None, None] * (ve0 - mu)
      errors[sampler, num_steps] = float(np.abs(ve - exact)[sigmas >= 0.5].max())
  assert 3 < errors['euler', 10] / errors['euler', 40] < 6, errors  # first order
  for sampler in ('heun', 'dpmpp_2m'):
    assert errors[sampler, 10] / errors[sampler, 40] > 10, errors  # second order
    assert errors[sampler, 40] < errors['euler', 40] / 10, errors


# ---------------------------------------------------------------------------------------------------- configs


def test_config_defaults_cover_every_diffusers_field():
  for name, defaults in scheduler_config.DEFAULTS.items():
    params = dict(inspect.signature(getattr(diffusers, name).__init__).parameters)
    params.pop('self')
    assert set(params) == set(defaults), name
    for field, param in params.items():
      assert param.default == defaults[field], (name, field)


CONFIGS = [  # class, its config (beyond the betas), steps
    ('DDIMScheduler', {'steps_offset': 1, 'set_alpha_to_one': False, 'prediction_type': 'v_prediction'}, 10),
    ('DDPMScheduler', {'steps_offset': 1, 'clip_sample': False}, 10),
    ('DPMSolverMultistepScheduler', {'use_karras_sigmas': True, 'prediction_type': 'v_prediction'}, 10),
    ('DPMSolverMultistepScheduler', {'timestep_spacing': 'leading', 'steps_offset': 1,
                                     'final_sigmas_type': 'sigma_min'}, 20),
    ('EulerDiscreteScheduler', {'use_karras_sigmas': True, 'final_sigmas_type': 'sigma_min'}, 10),
    ('EulerDiscreteScheduler', {'timestep_spacing': 'leading', 'steps_offset': 1}, 10),
    ('EulerAncestralDiscreteScheduler', {'prediction_type': 'v_prediction'}, 10),
    ('HeunDiscreteScheduler', {'use_karras_sigmas': True}, 8),
    ('FlowMatchEulerDiscreteScheduler', {'shift': 3.0}, 10),
]


@pytest.mark.parametrize('class_name,config,num_steps', CONFIGS, ids=[c[0] for c in CONFIGS])
def test_saved_scheduler_config_reads_back_as_its_sampler(tmp_path, monkeypatch, class_name, config, num_steps):
  betas = {} if 'Flow' in class_name else {'beta_schedule': 'scaled_linear', 'beta_start': 8.5e-4,
                                             'beta_end': 1.2e-2}
  getattr(diffusers, class_name)(**betas, **config).save_pretrained(tmp_path / 'scheduler')
  name, options, schedule = scheduler_config.sampler_from_scheduler_config(tmp_path)  # a pipeline folder
  reference = getattr(diffusers, class_name).from_pretrained(tmp_path / 'scheduler')
  assert (schedule is None) == ('Flow' in class_name)
  model, noise, rng = ToyModel(seed=1), _normal(2), _key(3)
  if name == 'euler_ancestral':
    _replay(monkeypatch, diffusers.schedulers.scheduling_euler_ancestral_discrete, rng, num_steps)
  if name == 'ddpm':
    _replay(monkeypatch, diffusers.schedulers.scheduling_ddpm, rng, num_steps)
  theirs = _reference(reference, model, noise, num_steps)
  _, trajectory = samplers.sample(model.jax, schedule, jnp.asarray(noise), rng, sampler=name, num_steps=num_steps,
                                  return_trajectory=True, **options)
  assert _relative_error(trajectory['x'], theirs) <= TOL


def test_pndm_maps_to_ddim_on_the_same_time_steps(tmp_path):
  # Stable Diffusion 1.5's scheduler_config.json, leftover clip_sample included.
  sd15 = {'_class_name': 'PNDMScheduler', '_diffusers_version': '0.6.0', 'beta_end': 0.012,
          'beta_schedule': 'scaled_linear', 'beta_start': 0.00085, 'num_train_timesteps': 1000,
          'set_alpha_to_one': False, 'skip_prk_steps': True, 'steps_offset': 1, 'trained_betas': None,
          'clip_sample': False}
  name, options, schedule = scheduler_config.sampler_from_scheduler_config(sd15)
  assert name == 'ddim'
  assert options == {'prediction_type': 'epsilon', 'timestep_spacing': 'leading', 'steps_offset': 1,
                     'clip_x0': False, 'set_alpha_to_one': False}
  np.testing.assert_allclose(schedule.alphas_cumprod, _schedule('scaled_linear').alphas_cumprod)
  # What diffusers users get by swapping the scheduler: DDIMScheduler.from_config(pndm.config).
  diffusers.PNDMScheduler.from_config(sd15).save_pretrained(tmp_path)
  ddim = diffusers.DDIMScheduler.from_config(diffusers.PNDMScheduler.from_pretrained(tmp_path).config,
                                             clip_sample=False)
  model, noise = ToyModel(seed=5), _normal(6)
  theirs = _reference(ddim, model, noise, 10)
  _, trajectory = samplers.sample(model.jax, schedule, jnp.asarray(noise), None, sampler=name, num_steps=10,
                                  return_trajectory=True, **options)
  assert _relative_error(trajectory['x'], theirs) <= TOL


@pytest.mark.parametrize('config,field', [
    ({'_class_name': 'LMSDiscreteScheduler'}, "_class_name='LMSDiscreteScheduler'"),
    ({'_class_name': 'UniPCMultistepScheduler'}, "_class_name='UniPCMultistepScheduler'"),
    ({}, '_class_name=None'),
    ({'_class_name': 'DPMSolverMultistepScheduler', 'solver_order': 3}, 'solver_order=3'),
    ({'_class_name': 'DPMSolverMultistepScheduler', 'algorithm_type': 'sde-dpmsolver++'}, 'algorithm_type'),
    ({'_class_name': 'DPMSolverMultistepScheduler', 'thresholding': True}, 'thresholding=True'),
    ({'_class_name': 'DPMSolverMultistepScheduler', 'lambda_min_clipped': -5.1}, 'lambda_min_clipped=-5.1'),
    ({'_class_name': 'EulerDiscreteScheduler', 'timestep_type': 'continuous'}, 'timestep_type'),
    ({'_class_name': 'EulerDiscreteScheduler', 'sigma_max': 80.0}, 'sigma_max=80.0'),
    ({'_class_name': 'HeunDiscreteScheduler', 'beta_schedule': 'exp'}, "beta_schedule='exp'"),
    ({'_class_name': 'DDIMScheduler', 'rescale_betas_zero_snr': True}, 'rescale_betas_zero_snr=True'),
    ({'_class_name': 'DDIMScheduler', 'clip_sample_range': 2.0}, 'clip_sample_range=2.0'),
    ({'_class_name': 'DDPMScheduler', 'variance_type': 'learned_range'}, 'variance_type'),
    ({'_class_name': 'DDIMScheduler', 'timestep_spacing': 'karras'}, 'timestep_spacing'),
    ({'_class_name': 'FlowMatchEulerDiscreteScheduler', 'use_dynamic_shifting': True}, 'use_dynamic_shifting'),
])
def test_unsupported_config_values_name_the_field(config, field):
  with pytest.raises(ValueError, match=field.replace('(', '\\(')) as info:
    scheduler_config.sampler_from_scheduler_config(config)
  assert '\n' not in str(info.value)


def test_config_reads_from_a_json_file_and_uses_class_defaults(tmp_path):
  path = tmp_path / 'scheduler_config.json'
  path.write_text('{"_class_name": "HeunDiscreteScheduler", "clip_sample": true, "lambda_min_clipped": -Infinity}')
  name, options, schedule = scheduler_config.sampler_from_scheduler_config(path)
  assert name == 'heun'
  assert options == {'prediction_type': 'epsilon', 'timestep_spacing': 'linspace', 'steps_offset': 0,
                     'clip_x0': True, 'use_karras_sigmas': False}
  # Heun's own defaults: linear betas from 0.00085 to 0.012.
  np.testing.assert_allclose(schedule.betas, schedules.make_betas('linear', T, 0.00085, 0.012), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- flow matching


def _velocity_oracle(x0):
  """The exact velocity of the straight path when the data is the single point x0: (x_t - x0) / t."""
  return lambda x, timestep: (x - x0) / (timestep / T)[:, None, None, None]


@pytest.mark.parametrize('time_sampling', flow.TIME_SAMPLINGS)
def test_flow_loss_is_zero_for_the_velocity_oracle_and_positive_otherwise(time_sampling):
  x0 = jnp.asarray(_normal(0, (64, 2, 2, 1)))
  loss, aux = flow.flow_matching_loss(_velocity_oracle(x0), x0, _key(0), time_sampling=time_sampling)
  assert float(loss) < 1e-8
  assert aux['loss_per_example'].shape == (64,) and aux['sigmas'].dtype == jnp.float32
  zero_loss, _ = flow.flow_matching_loss(lambda x, t: jnp.zeros_like(x), x0, _key(0), time_sampling=time_sampling)
  # E|noise - x0|^2 = 1 + E[x0^2] per element.
  assert float(zero_loss) == pytest.approx(1 + float(jnp.mean(x0**2)), rel=0.15)
  # A reflow pair's noise is used as given: the target noise - x0 itself is then predicted exactly.
  noise = jnp.asarray(_normal(1, x0.shape))
  loss, _ = flow.flow_matching_loss(lambda x, t: noise - x0, x0, _key(1), noise=noise)
  assert float(loss) == 0.0


def test_time_sampling_distributions():
  x0 = jnp.zeros((40_000, 1))
  _, aux = flow.flow_matching_loss(lambda x, t: x, x0, _key(2), logit_mean=0.5, logit_std=0.8)
  t = np.asarray(aux['sigmas'], np.float64)
  logit = np.log(t / (1 - t))
  assert logit.mean() == pytest.approx(0.5, abs=0.02) and logit.std() == pytest.approx(0.8, rel=0.02)
  assert float(aux['mean_sigma']) == pytest.approx(t.mean(), rel=1e-5)
  uniform = np.asarray(flow.sample_time(_key(3), 40_000, time_sampling='uniform'), np.float64)
  assert uniform.min() >= 0 and uniform.max() < 1
  assert uniform.mean() == pytest.approx(0.5, abs=0.01) and uniform.var() == pytest.approx(1 / 12, rel=0.03)
  with pytest.raises(ValueError, match="'logit_normal', 'uniform'"):
    flow.sample_time(_key(3), 4, time_sampling='cosmap')


def test_flow_loss_weights_mask_examples_and_gradients_flow():
  x0 = jnp.asarray(_normal(0, (4, 4, 4, 3)))
  weights = jnp.array([1.0, 0.0, 1.0, 0.0])
  model = ToyModel(seed=3)

  def loss_fn(w, data, weights):
    model_fn = lambda x, t: jnp.einsum('bhwc,cd->bhwd', x, w) + model.b * jnp.sin(t / 100)[:, None, None, None]
    loss, aux = flow.flow_matching_loss(model_fn, data, _key(4), weights=weights, time_sampling='uniform')
    return loss, aux['loss_per_example']

  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  w0 = jnp.asarray(model.w)
  (loss, per_example), _ = loss_and_grad(w0, x0, weights)
  assert float(loss) == pytest.approx(float(per_example[jnp.array([0, 2])].mean()), rel=1e-6)
  (loss_c, _), grad = loss_and_grad(w0, x0.at[1].set(jnp.nan).at[3].set(100.0), weights)
  assert float(loss_c) == float(loss)
  assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).sum()) > 1e-3
  (loss_z, _), grad_z = loss_and_grad(w0, x0, jnp.zeros(4))
  assert float(loss_z) == 0.0 and float(jnp.abs(grad_z).sum()) == 0.0


def test_flow_sampler_follows_the_exact_flow_and_reflow_pairs():
  # Straight paths are integrated exactly by Euler, in any number of steps.
  x0 = jnp.asarray(_normal(5))
  for num_steps in (1, 7):
    out = samplers.sample(_velocity_oracle(x0), None, jnp.asarray(_normal(6)), None, sampler='flow_euler',
                          num_steps=num_steps, prediction_type='flow_prediction', shift=3.0)
    np.testing.assert_allclose(out, x0, atol=1e-5)
  # Data ~ N(mu, s^2): the marginal velocity E[noise - x0 | x_t] is linear, and its flow maps noise z to mu + s z.
  mu, s = 0.3, 0.5

  def velocity(x, timestep):
    t = (timestep / T)[:, None]
    cov = t - (1 - t) * s**2
    return -mu + cov / ((1 - t) ** 2 * s**2 + t**2) * (x - (1 - t) * mu)

  z = jnp.asarray(_normal(7, (512, 1)))
  errors = {}
  for num_steps in (25, 100):
    noise, pairs = flow.reflow_pairs(velocity, z, num_steps=num_steps)
    assert noise is z
    errors[num_steps] = float(jnp.abs(pairs - (mu + s * z)).max())
  assert errors[100] < 0.03 and 3 < errors[25] / errors[100] < 5, errors  # first order
