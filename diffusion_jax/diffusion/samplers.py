"""Reverse-process samplers, each a step function run under one `lax.scan`, and the public `sample`.

A sampler is a `Sampler(init, step)`: `init(x_T) -> carry` and `step(model_fn, x, carry, t, t_prev, rng) -> (x_prev,
carry, x0_pred)`. The loop (`run_chain`) scans the step over static per-step inputs (t, t_prev), so a whole sampling
run is one compiled program with no host round trip per step. For DDIM/DDPM t and t_prev are integer time steps;
the sigma-space solvers of `solvers.py` take one row of their per-step tables instead (dicts of sigmas, model time
steps, orders). The carry is where multistep solvers (DPM-Solver++ keeps its last x_0 prediction) keep history, and
the step gets `model_fn` rather than one output so that solvers needing several evaluations per step (Heun) fit the
same loop. Add a sampler by adding a `SamplerSpec` (its plan builder and options) to `SAMPLERS`.

DDIM/DDPM time steps follow diffusers' `timestep_spacing` and `steps_offset`, and by default its
`set_alpha_to_one=True`: the step after the last time step lands on alpha_bar = 1, i.e. on x_0 itself. The other
samplers reproduce their diffusers schedulers step by step (see `sample` and `solvers.py` for how).

Stochastic steps take their noise from `solvers.draw_noise(rng, x)`: by default `rng` is the step's key, but
`run_chain(..., step_noise=...)` scans given noise instead (one row per step), so that a chain can replay the noise
another implementation drew (diffusers' pipelines draw fresh torch noise in every step).
"""
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import schedules as sched_lib
from diffusion_jax.diffusion import solvers

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SPACINGS = ('leading', 'trailing', 'linspace')


def sampling_timesteps(num_train_steps: int, num_steps: int, spacing: str = 'leading',
                       steps_offset: int = 0) -> np.ndarray:
  """The descending int32 time steps a `num_steps` DDIM/DDPM sampler visits, as diffusers' `set_timesteps`.

  'leading' is DDIM's original k * (T // n) (+ `steps_offset`, which only 'leading' uses, as in diffusers);
  'trailing' ends at T - 1 and so starts from pure noise (see "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", Table 2); 'linspace' spreads n points over [0, T - 1].
  """
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f'num_steps must be in [1, {num_train_steps}], got {num_steps}')
  if spacing == 'leading':
    steps = np.arange(num_steps)[::-1] * (num_train_steps // num_steps) + steps_offset
    if steps[0] >= num_train_steps:
      raise ValueError(f'steps_offset={steps_offset} puts the first time step past T - 1 = {num_train_steps - 1}')
  elif spacing == 'trailing':
    steps = np.round(np.arange(num_train_steps, 0, -num_train_steps / num_steps)) - 1
  elif spacing == 'linspace':
    steps = np.round(np.linspace(0, num_train_steps - 1, num_steps))[::-1]
  else:
    raise ValueError(f'unknown timestep_spacing {spacing!r}; expected one of {SPACINGS}')
  return steps.astype(np.int32)


def _chain(num_train_steps: int, num_steps: int, spacing: str, steps_offset: int = 0,
           set_alpha_to_one: bool = True):
  """(t, t_prev) pairs; the last t_prev is -1 (alpha_bar = 1) or, without set_alpha_to_one, 0 (alphas_cumprod[0]).

  t_prev is the next time step of the sequence. diffusers' DDIMScheduler instead uses t - T // n, which is the
  same for 'leading' (and 'trailing' when n divides T) and otherwise steps to a level the chain never visits.
  """
  steps = sampling_timesteps(num_train_steps, num_steps, spacing, steps_offset)
  return steps, np.append(steps[1:], -1 if set_alpha_to_one else 0).astype(np.int32)


def alpha_bar_at(schedule: sched_lib.NoiseSchedule, t: jax.Array) -> jax.Array:
  """alphas_cumprod[t], with t < 0 meaning the clean level alpha_bar = 1 (diffusers' set_alpha_to_one=True)."""
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def _x0_and_eps(schedule, model_output, x, t, prediction_type, clip_x0):
  """The x_0 a step moves towards (clipped to [-1, 1] if asked) and the model's epsilon.

  As diffusers (use_clipped_model_output=False), epsilon comes from the unclipped prediction.
  """
  x0, eps = sched_lib.x0_and_eps(model_output, x, alpha_bar_at(schedule, t), prediction_type)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  return x0, eps


def _chain_posterior(schedule: sched_lib.NoiseSchedule, t, t_prev):
  """(coef_x0, coef_xt, variance) of q(x_{t_prev} | x_t, x_0) for the (possibly strided) chain t -> t_prev.

  Between adjacent steps these are the schedule's tables, so a full-length chain is Ho et al.'s sampler to the
  digit: recomputing beta_t = 1 - abar_t / abar_{t-1} from float32 tables keeps only ~3 digits of a beta ~ 1e-4.
  A stride k makes the chain's beta k times larger and that cancellation k times milder.
  """
  a_t = alpha_bar_at(schedule, t)
  a_prev = alpha_bar_at(schedule, t_prev)
  alpha = a_t / a_prev
  beta = 1.0 - alpha
  coef_x0 = jnp.sqrt(a_prev) * beta / (1.0 - a_t)
  coef_xt = jnp.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t)
  variance = (1.0 - a_prev) / (1.0 - a_t) * beta
  adjacent = t_prev == t - 1
  i = jnp.maximum(t, 0)
  return (jnp.where(adjacent, schedule.posterior_mean_coef1[i], coef_x0),
          jnp.where(adjacent, schedule.posterior_mean_coef2[i], coef_xt),
          jnp.where(adjacent, schedule.posterior_variance[i], variance))


def ddim_step(schedule: sched_lib.NoiseSchedule, model_output: jax.Array, x: jax.Array, t, t_prev, *,
              eta: float = 0.0, noise: jax.Array | None = None, prediction_type: str = 'epsilon',
              clip_x0: bool = True):
  """One DDIM update x_t -> x_{t_prev} (Song et al. eq. 12, sigma from eq. 16); returns (x_prev, x0_pred).

  eta = 0 is the deterministic sampler, eta = 1 has DDPM's posterior variance; `noise=None` leaves the noise out.
  """
  a_prev = alpha_bar_at(schedule, t_prev)
  x0, eps = _x0_and_eps(schedule, model_output, x, t, prediction_type, clip_x0)
  std = eta * jnp.sqrt(_chain_posterior(schedule, t, t_prev)[2])
  # The max only guards float rounding when a_prev = 1; for eta <= 1 the argument is >= 0 exactly.
  x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_prev - std**2, 0.0)) * eps
  if noise is not None:
    x_prev = x_prev + std * noise
  return x_prev, x0


def ddpm_step(schedule: sched_lib.NoiseSchedule, model_output: jax.Array, x: jax.Array, t, t_prev, *,
              noise: jax.Array | None = None, prediction_type: str = 'epsilon', clip_x0: bool = True):
  """One ancestral step: a draw from q(x_{t_prev} | x_t, x0_pred) of the chain t -> t_prev; (x_prev, x0_pred).

  The chain's own beta, 1 - abar_t / abar_prev, replaces beta_t, so a strided chain has the right posterior and
  t_prev = t - 1 gives Ho et al.'s sampler ("fixed_small" variance). `noise=None` returns the mean.
  """
  x0, _ = _x0_and_eps(schedule, model_output, x, t, prediction_type, clip_x0)
  coef_x0, coef_xt, variance = _chain_posterior(schedule, t, t_prev)
  mean = coef_x0 * x0 + coef_xt * x
  if noise is None:
    return mean, x0
  return mean + jnp.sqrt(jnp.maximum(variance, 0.0)) * noise, x0


def unclip_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
  """UnCLIPScheduler's descending time steps: round(k (T - 1) / (n - 1)), from T - 1 down to 0 (Karlo's spacing)."""
  if not 2 <= num_steps <= num_train_steps:
    raise ValueError(f'the unclip sampler takes num_steps in [2, {num_train_steps}], got {num_steps}')
  ratio = (num_train_steps - 1) / (num_steps - 1)
  return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int32)


UNCLIP_VARIANCES = ('fixed_small_log', 'learned_range')


def unclip_step(schedule: sched_lib.NoiseSchedule, model_output: jax.Array, x: jax.Array, t, t_prev, *,
                noise: jax.Array | None = None, prediction_type: str = 'epsilon',
                variance_type: str = 'fixed_small_log', clip_x0: bool = True, clip_range: float = 1.0):
  """One step of diffusers' UnCLIPScheduler (Karlo's DDPM variant); returns (x_prev, x0_pred).

  The posterior of the chain t -> t_prev, with betas[t] between adjacent steps and 1 - abar_t / abar_prev
  otherwise, written as diffusers writes it. 'fixed_small_log' noise has the posterior variance; with
  'learned_range' the model output has 2C channels (last axis): the prediction, then v in [-1, 1] that interpolates
  the log variance between the posterior's (v = -1) and beta's (v = 1). No noise is added at t = 0.
  """
  if variance_type not in UNCLIP_VARIANCES:
    raise ValueError(f'unknown variance_type {variance_type!r}; expected one of {UNCLIP_VARIANCES}')
  channels = x.shape[-1]
  if variance_type == 'learned_range':
    if model_output.shape[-1] != 2 * channels:
      raise ValueError(f"variance_type='learned_range' needs a model output of 2 x {channels} channels (prediction, "
                       f'variance value), got {model_output.shape[-1]}')
    model_output, predicted_variance = jnp.split(model_output, 2, axis=-1)
  a_t = alpha_bar_at(schedule, t)
  a_prev = alpha_bar_at(schedule, t_prev)
  adjacent = t_prev == t - 1
  beta = jnp.where(adjacent, schedule.betas[jnp.maximum(t, 0)], 1.0 - a_t / a_prev)
  alpha = jnp.where(adjacent, schedule.alphas[jnp.maximum(t, 0)], 1.0 - beta)
  if prediction_type == 'epsilon':
    x0 = (x - jnp.sqrt(1.0 - a_t) * model_output) / jnp.sqrt(a_t)
  elif prediction_type == 'sample':
    x0 = model_output
  else:
    raise ValueError(f"the unclip sampler takes prediction_type 'epsilon' or 'sample', got {prediction_type!r}")
  if clip_x0:
    x0 = jnp.clip(x0, -clip_range, clip_range)
  mean = jnp.sqrt(a_prev) * beta / (1.0 - a_t) * x0 + jnp.sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t) * x
  if noise is None:
    return mean, x0
  # At t = 0 the variance is 0 and its log -inf; the step adds no noise there, so any finite stand-in does.
  variance = jnp.where(t > 0, (1.0 - a_prev) / (1.0 - a_t) * beta, 1.0)
  if variance_type == 'fixed_small_log':
    std = jnp.sqrt(jnp.maximum(variance, 1e-20))
  else:
    frac = (predicted_variance + 1.0) / 2.0
    std = jnp.exp(0.5 * (frac * jnp.log(beta) + (1.0 - frac) * jnp.log(variance)))
  return mean + jnp.where(t > 0, std, 0.0) * noise, x0


class Sampler(NamedTuple):
  """A step function and its carry's initial value; see the module docstring for the signatures."""
  init: Callable[[jax.Array], Any]
  step: Callable[..., tuple]


class Plan(NamedTuple):
  """A sampler with the per-step inputs `run_chain` scans it over (leading axis [num_steps]) for one chain.

  `noise_scale` multiplies the standard normal `noise` given to `sample`: diffusers' `init_noise_sigma`, 1 for the
  samplers whose state is x_VP or a flow sample, sigma_max (or its VP level) for the Euler family's x_VE.
  """
  sampler: Sampler
  timesteps: Any
  prev_timesteps: Any
  noise_scale: Any


def _time_vector(x, t):
  return jnp.full((x.shape[0],), t, dtype=jnp.int32)


def _is_literal(value, literal) -> bool:
  """value == literal for Python numbers; False for arrays, which may be traced."""
  return isinstance(value, (bool, int, float, str)) and value == literal


def _ddim_plan(schedule, num_steps, o) -> Plan:
  eta, prediction_type, clip_x0 = o['eta'], o['prediction_type'], o['clip_x0']
  # A literal eta = 0 draws no noise at all: cheaper, and bit-identical whatever the rng.
  stochastic = not _is_literal(eta, 0)

  def step(model_fn, x, carry, t, t_prev, rng):
    out = model_fn(x, _time_vector(x, t))
    noise = solvers.draw_noise(rng, x) if stochastic else None
    x_prev, x0 = ddim_step(schedule, out, x, t, t_prev, eta=eta, noise=noise, prediction_type=prediction_type,
                           clip_x0=clip_x0)
    return x_prev, carry, x0

  steps, prev_steps = _chain(schedule.num_timesteps, num_steps, o['timestep_spacing'], o['steps_offset'],
                             o['set_alpha_to_one'])
  return Plan(Sampler(init=lambda x: (), step=step), steps, prev_steps, 1.0)


def _ddpm_plan(schedule, num_steps, o) -> Plan:
  # Ancestral sampling has no eta knob; its variance is the posterior's.
  prediction_type, clip_x0 = o['prediction_type'], o['clip_x0']

  def step(model_fn, x, carry, t, t_prev, rng):
    out = model_fn(x, _time_vector(x, t))
    noise = solvers.draw_noise(rng, x)
    x_prev, x0 = ddpm_step(schedule, out, x, t, t_prev, noise=noise, prediction_type=prediction_type,
                           clip_x0=clip_x0)
    return x_prev, carry, x0

  steps, prev_steps = _chain(schedule.num_timesteps, num_steps, o['timestep_spacing'], o['steps_offset'])
  return Plan(Sampler(init=lambda x: (), step=step), steps, prev_steps, 1.0)


def _unclip_plan(schedule, num_steps, o) -> Plan:
  step_options = dict(prediction_type=o['prediction_type'], variance_type=o['variance_type'], clip_x0=o['clip_x0'],
                      clip_range=o['clip_x0_range'])

  def step(model_fn, x, carry, t, t_prev, rng):
    out = model_fn(x, _time_vector(x, t))
    x_prev, x0 = unclip_step(schedule, out, x, t, t_prev, noise=solvers.draw_noise(rng, x), **step_options)
    return x_prev, carry, x0

  steps = unclip_timesteps(schedule.num_timesteps, num_steps)
  # The last step (t = 0) goes to t - 1 = -1, i.e. alpha_bar = 1, as diffusers' step with prev_timestep=None.
  return Plan(Sampler(init=lambda x: (), step=step), steps, np.append(steps[1:], -1).astype(np.int32), 1.0)


def _euler_family_plan(step_fn, heun: bool = False):
  def build(schedule, num_steps, o) -> Plan:
    table = solvers.euler_chain(schedule.alphas_cumprod, num_steps, spacing=o['timestep_spacing'],
                                steps_offset=o['steps_offset'], use_karras_sigmas=o['use_karras_sigmas'],
                                final_sigmas_type=o['final_sigmas_type'])
    sigmas, timesteps = table['sigmas'], table['timesteps']
    level = {'sigma': sigmas[:-1], 'timestep': timesteps}
    # The time step after the last is never used (Heun skips its corrector there); 0 keeps the row's shape.
    next_level = {'sigma': sigmas[1:], 'timestep': jnp.append(timesteps[1:], 0.0)}
    if heun:
      level['second_order'] = np.arange(num_steps) < num_steps - 1
    step = functools.partial(step_fn, prediction_type=o['prediction_type'], clip_x0=o['clip_x0'])
    return Plan(Sampler(init=lambda x: (), step=step), level, next_level, table['init_noise_sigma'])
  return build


def _dpmpp_2m_plan(schedule, num_steps, o) -> Plan:
  table = solvers.dpm_chain(schedule.alphas_cumprod, num_steps, spacing=o['timestep_spacing'],
                            steps_offset=o['steps_offset'], use_karras_sigmas=o['use_karras_sigmas'],
                            final_sigmas_type=o['final_sigmas_type'])
  sigmas = table['sigmas']
  # The first step's "previous" sigma is its own; it is first order, so the value only has to be finite.
  level = {'sigma': sigmas[:-1], 'sigma_prev': jnp.concatenate([sigmas[:1], sigmas[:-2]]),
           'timestep': table['timesteps'], 'order': table['order']}
  step = functools.partial(solvers.dpmpp_2m_step, prediction_type=o['prediction_type'], clip_x0=o['clip_x0'])
  return Plan(Sampler(init=solvers.dpmpp_2m_init, step=step), level, {'sigma': sigmas[1:]}, 1.0)


def _flow_euler_plan(schedule, num_steps, o) -> Plan:
  del schedule  # A flow needs no betas; its time runs over num_train_timesteps.
  table = solvers.flow_chain(num_steps, num_train_timesteps=o['num_train_timesteps'], shift=o['shift'],
                             use_karras_sigmas=o['use_karras_sigmas'])
  sigmas = table['sigmas']
  step = functools.partial(solvers.flow_euler_step, clip_x0=o['clip_x0'])
  return Plan(Sampler(init=lambda x: (), step=step), {'sigma': sigmas[:-1], 'timestep': table['timesteps']},
              {'sigma': sigmas[1:]}, 1.0)


class SamplerSpec(NamedTuple):
  """A registry entry: its plan builder, the keyword options of `sample` it takes, and its diffusers defaults."""
  build: Callable[..., Plan]
  options: frozenset
  clip_x0: bool
  prediction_types: tuple = sched_lib.PREDICTION_TYPES


FLOW_PREDICTION = 'flow_prediction'  # diffusers' name for a model of the velocity noise - x_0
_SPACED = frozenset({'timestep_spacing', 'steps_offset'})
SAMPLERS = {
    'ddim': SamplerSpec(_ddim_plan, _SPACED | {'eta', 'set_alpha_to_one'}, clip_x0=True),
    'ddpm': SamplerSpec(_ddpm_plan, _SPACED | {'eta'}, clip_x0=True),
    'dpmpp_2m': SamplerSpec(_dpmpp_2m_plan, _SPACED | {'use_karras_sigmas', 'final_sigmas_type'}, clip_x0=False),
    'euler': SamplerSpec(_euler_family_plan(solvers.euler_step), _SPACED | {'use_karras_sigmas', 'final_sigmas_type'},
                         clip_x0=False),
    'euler_ancestral': SamplerSpec(_euler_family_plan(solvers.euler_ancestral_step), _SPACED | {'use_karras_sigmas'},
                                   clip_x0=False),
    'heun': SamplerSpec(_euler_family_plan(solvers.heun_step, heun=True), _SPACED | {'use_karras_sigmas'},
                        clip_x0=False),
    'flow_euler': SamplerSpec(_flow_euler_plan, frozenset({'use_karras_sigmas', 'shift', 'num_train_timesteps'}),
                              clip_x0=False, prediction_types=(FLOW_PREDICTION,)),
    'unclip': SamplerSpec(_unclip_plan, frozenset({'variance_type', 'clip_x0_range'}), clip_x0=True,
                          prediction_types=('epsilon', 'sample')),
}
# Samplers that add fresh noise in (some of) their steps, so `sample` needs an rng or step_noise.
NOISY_SAMPLERS = ('ddpm', 'euler_ancestral', 'unclip')
# The value each option has when a caller does not set it; a sampler refuses any other value of one it does not take.
_OPTION_DEFAULTS = {'eta': 0.0, 'timestep_spacing': 'leading', 'steps_offset': 0, 'set_alpha_to_one': True,
                    'use_karras_sigmas': False, 'final_sigmas_type': 'zero', 'shift': 1.0,
                    'num_train_timesteps': 1000, 'variance_type': 'fixed_small_log', 'clip_x0_range': 1.0}


def make_plan(schedule: sched_lib.NoiseSchedule | None, *, sampler: str = 'ddim', num_steps: int = 50,
              prediction_type: str = 'epsilon', clip_x0: bool | None = None, **options) -> Plan:
  """The `Plan` `sample` runs; `options` are `sample`'s keyword options (see there), checked against the sampler."""
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; expected one of {tuple(SAMPLERS)}')
  spec = SAMPLERS[sampler]
  if prediction_type not in spec.prediction_types:
    raise ValueError(f'sampler {sampler!r} takes prediction_type in {spec.prediction_types}, got {prediction_type!r}')
  unknown = set(options) - set(_OPTION_DEFAULTS)
  if unknown:
    raise TypeError(f'unknown sampler options {sorted(unknown)}; expected some of {sorted(_OPTION_DEFAULTS)}')
  for name, value in options.items():
    if name not in spec.options and not _is_literal(value, _OPTION_DEFAULTS[name]):
      raise ValueError(f'sampler {sampler!r} does not take {name}={value!r}')
  if schedule is None and sampler != 'flow_euler':
    raise ValueError(f'sampler {sampler!r} needs a NoiseSchedule')
  resolved = dict(_OPTION_DEFAULTS, **options, prediction_type=prediction_type,
                  clip_x0=spec.clip_x0 if clip_x0 is None else clip_x0)
  return spec.build(schedule, num_steps, resolved)


def _as_steps(values):
  """Per-step inputs as scan operands: integers as int32 (the time steps models get), floats as float32."""
  values = values if isinstance(values, jax.Array) else np.asarray(values)
  if jnp.issubdtype(values.dtype, jnp.bool_):
    return jnp.asarray(values, jnp.bool_)
  return jnp.asarray(values, jnp.int32 if jnp.issubdtype(values.dtype, jnp.integer) else jnp.float32)


def run_chain(sampler: Sampler, model_fn: ModelFn, x: jax.Array, timesteps, prev_timesteps, rng,
              return_trajectory: bool = False, step_noise: jax.Array | None = None):
  """Scans `sampler.step` over the per-step inputs; x keeps its dtype across steps (a scan carry must).

  `timesteps` / `prev_timesteps` are arrays or pytrees of arrays with a leading [num_steps] axis. Step i gets the
  key `jax.random.split(rng, num_steps)[i]`: a contract the parity tests rely on to replay a sampler's noise.
  `step_noise` [num_steps, *x.shape] (with rng=None) gives each step its standard normal noise instead: row i is
  step i's, whatever the sampler, and a step that adds none (the last of ddpm and unclip) ignores its row. A plan
  cut with `latent_chain.tail` takes the matching rows.
  """
  timesteps = jax.tree.map(_as_steps, timesteps)
  prev_timesteps = jax.tree.map(_as_steps, prev_timesteps)
  num_steps = jax.tree.leaves(timesteps)[0].shape[0]
  if step_noise is None:
    keys = None if rng is None else jax.random.split(rng, num_steps)
  else:
    if rng is not None:
      raise ValueError('step_noise replaces the rng; pass rng=None')
    keys = jnp.asarray(step_noise)
    if keys.shape != (num_steps, *x.shape) or not jnp.issubdtype(keys.dtype, jnp.floating):
      raise ValueError(f'step_noise must be a float array of shape {(num_steps, *x.shape)} (steps, *x.shape), '
                       f'got {keys.dtype} {keys.shape}')

  def body(state, inputs):
    x, carry = state
    t, t_prev, key = inputs
    x_prev, carry, x0 = sampler.step(model_fn, x, carry, t, t_prev, key)
    x_prev = x_prev.astype(x.dtype)
    return (x_prev, carry), ({'x': x_prev, 'x0_pred': x0} if return_trajectory else None)

  (x, _), trajectory = jax.lax.scan(body, (x, sampler.init(x)), (timesteps, prev_timesteps, keys))
  return (x, trajectory) if return_trajectory else x


def sample(model_fn: ModelFn, schedule: sched_lib.NoiseSchedule | None, noise: jax.Array, rng: jax.Array | None, *,
           sampler: str = 'ddim', num_steps: int = 50, eta: float = 0.0, prediction_type: str = 'epsilon',
           clip_x0: bool | None = None, timestep_spacing: str = 'leading', steps_offset: int = 0,
           set_alpha_to_one: bool = True, use_karras_sigmas: bool = False, final_sigmas_type: str = 'zero',
           shift: float = 1.0, num_train_timesteps: int = 1000, variance_type: str = 'fixed_small_log',
           clip_x0_range: float = 1.0, step_noise: jax.Array | None = None, return_trajectory: bool = False):
  """Runs the reverse process from `noise` to x_0 in `num_steps` steps, as one compiled scan.

  Samplers, each the diffusers scheduler of the same name step for step: 'ddim' (DDIMScheduler; `eta`),
  'ddpm' (DDPMScheduler, fixed_small variance), 'dpmpp_2m' (DPMSolverMultistepScheduler, dpmsolver++, order 2),
  'euler' (EulerDiscreteScheduler), 'euler_ancestral' (EulerAncestralDiscreteScheduler), 'heun'
  (HeunDiscreteScheduler: 2 model calls per step but the last), 'flow_euler' (FlowMatchEulerDiscreteScheduler) and
  'unclip' (UnCLIPScheduler, Karlo's DDPM variant: its own time steps from T - 1 to 0, 2 <= num_steps).

  `noise` is a standard normal draw, as the latents a diffusers pipeline makes before multiplying them by the
  scheduler's `init_noise_sigma`; each sampler applies its own (`Plan.noise_scale`), so the same latents give the
  same sample here and there. `model_fn(x, t)` gets x in the parameterisation it was trained on (x_VP for DDPM
  models, diffusers' `scale_model_input` for the Euler family) and t of shape [B]: int32 for ddim, ddpm, dpmpp_2m and
  unclip; float32 for the Euler family (fractional with Karras sigmas or 'linspace' spacing) and for flow_euler (sigma *
  num_train_timesteps). `prediction_type` is 'epsilon', 'v_prediction' or 'sample' for DDPM-trained models and
  'flow_prediction' (a model of noise - x_0) for flow_euler, whose `schedule` may be None.

  Options (each refused by a sampler that does not take it, unless left at its default): `clip_x0` clips every
  step's x_0 estimate to [-1, 1] (diffusers' clip_sample; None takes the scheduler's default: on for ddim/ddpm/unclip,
  off for the others); `timestep_spacing` and `steps_offset` as diffusers (not flow_euler; the default 'leading' is
  DDIM's and DDPM's, where diffusers' Euler family and DPM++ default to 'linspace'); `set_alpha_to_one` (ddim);
  `use_karras_sigmas` (all but ddim/ddpm); `final_sigmas_type` 'zero' or 'sigma_min' (euler, dpmpp_2m); `shift` and
  `num_train_timesteps` (flow_euler); `variance_type` 'fixed_small_log' or 'learned_range' (unclip: the model
  then outputs 2C channels on the last axis, prediction and variance value; see `guided_learned_range`) and
  `clip_x0_range` (unclip: clip_x0 clips to [-range, range], diffusers' clip_sample_range). `eta` is DDIM's and
  ignored by ddpm. The unclip sampler takes prediction_type 'epsilon' or 'sample'.

  `rng` feeds per-step noise (ddpm, euler_ancestral, unclip, ddim with eta != 0; may be None otherwise);
  `step_noise` [num_steps, *noise.shape] replaces it with given standard normal noise, row i for step i (see
  `run_chain`). With `return_trajectory`, also returns {'x': the sampler's state after each step, 'x0_pred': each
  step's x_0 estimate}, stacked along a leading [num_steps] axis; the state is what diffusers' `step` returns as
  prev_sample (x_VE for the Euler family, whose last state is x_0 itself when the last sigma is 0). Everything but
  the arrays must be static under jit.
  """
  plan = make_plan(schedule, sampler=sampler, num_steps=num_steps, prediction_type=prediction_type,
                   clip_x0=clip_x0, eta=eta, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
                   set_alpha_to_one=set_alpha_to_one, use_karras_sigmas=use_karras_sigmas,
                   final_sigmas_type=final_sigmas_type, shift=shift, num_train_timesteps=num_train_timesteps,
                   variance_type=variance_type, clip_x0_range=clip_x0_range)
  if rng is None and step_noise is None:
    if sampler in NOISY_SAMPLERS:
      raise ValueError(f'sampler {sampler!r} draws noise and needs an rng or step_noise')
    if sampler == 'ddim' and not _is_literal(eta, 0):
      raise ValueError(f'sampler {sampler!r} with eta={eta} draws noise and needs an rng or step_noise')
  x = noise if _is_literal(plan.noise_scale, 1.0) else (noise * plan.noise_scale).astype(noise.dtype)
  return run_chain(plan.sampler, model_fn, x, plan.timesteps, plan.prev_timesteps, rng, return_trajectory,
                   step_noise)


def _ddim_move(x, eps, a_from, a_to):
  """The deterministic DDIM map between two noise levels for a fixed epsilon; (a, b) and (b, a) are inverses."""
  x0 = (x - jnp.sqrt(1.0 - a_from) * eps) / jnp.sqrt(a_from)
  return jnp.sqrt(a_to) * x0 + jnp.sqrt(1.0 - a_to) * eps


def ddim_invert(model_fn: ModelFn, schedule: sched_lib.NoiseSchedule, x0: jax.Array, *, num_steps: int,
                prediction_type: str = 'epsilon', timestep_spacing: str = 'leading', fixed_point_iters: int = 0,
                return_trajectory: bool = False):
  """Runs deterministic DDIM backwards, x_0 -> x_T, visiting the sampler's chain in reverse.

  As diffusers' DDIMInverseScheduler, the step from level t_prev to t evaluates the model at (x_{t_prev}, t): x_t
  is not known yet, so this is only approximately the inverse of `sample(..., sampler='ddim', eta=0, clip_x0=False)`.
  `fixed_point_iters` > 0 re-evaluates the model at the current estimate of x_t and re-solves, converging to the
  exact inverse of that sampler step (as in "Effective Real Image Editing with Accelerated Iterative Diffusion
  Inversion"); each iteration costs one more model call per step.
  """
  if prediction_type not in sched_lib.PREDICTION_TYPES:
    raise ValueError(f'unknown prediction_type {prediction_type!r}; expected one of {sched_lib.PREDICTION_TYPES}')
  steps, prev_steps = _chain(schedule.num_timesteps, num_steps, timestep_spacing)

  def step(model_fn, x, carry, t_cur, t_next, rng):
    del rng
    a_cur = alpha_bar_at(schedule, t_cur)
    a_next = alpha_bar_at(schedule, t_next)
    t_vec = _time_vector(x, t_next)
    # An x_0 prediction says nothing about epsilon at alpha_bar = 1 (0/0), so read it at the target level there.
    read_at = jnp.where(t_cur >= 0, a_cur, a_next) if prediction_type == 'sample' else a_cur
    x0_pred, eps = sched_lib.x0_and_eps(model_fn(x, t_vec), x, read_at, prediction_type)
    x_next = _ddim_move(x, eps, a_cur, a_next)

    def refine(_, x_next):
      _, eps = sched_lib.x0_and_eps(model_fn(x_next, t_vec), x_next, a_next, prediction_type)
      return _ddim_move(x, eps, a_cur, a_next).astype(x.dtype)

    x_next = x_next.astype(x.dtype)
    if not (isinstance(fixed_point_iters, int) and fixed_point_iters == 0):  # may be traced: a while loop then
      x_next = jax.lax.fori_loop(0, fixed_point_iters, refine, x_next)
    return x_next, carry, x0_pred

  inverter = Sampler(init=lambda x: (), step=step)
  return run_chain(inverter, model_fn, x0, prev_steps[::-1], steps[::-1], None, return_trajectory)


def classifier_free_guidance(model_fn_batched: ModelFn, guidance_scale, guidance_rescale: float = 0.0) -> ModelFn:
  """Wraps a doubled-batch model into a guided `model_fn(x, t)` (Ho & Salimans 2021).

  `model_fn_batched` gets concat([x, x]) and concat([t, t]) and must condition the first half and not the second
  (e.g. by closing over concat([text, empty_text])): one call at twice the batch keeps the accelerator busier than
  two. Returns uncond + s * (cond - uncond), then, if `guidance_rescale` > 0, mixes in that output rescaled to the
  conditional prediction's per-example std ("Common Diffusion Noise Schedules and Sample Steps are Flawed", 3.4),
  which counters the over-exposure of large scales.
  """
  rescale = not (isinstance(guidance_rescale, (int, float)) and guidance_rescale == 0)

  def guided(x, t):
    out = model_fn_batched(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
    cond, uncond = jnp.split(out, 2)
    result = uncond + guidance_scale * (cond - uncond)
    if rescale:
      axes = tuple(range(1, result.ndim))
      # A ratio of stds, so the biased/unbiased choice (torch's default is unbiased) cancels.
      ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.maximum(jnp.std(result, axis=axes, keepdims=True), 1e-12)
      result = guidance_rescale * (result * ratio) + (1.0 - guidance_rescale) * result
    return result

  return guided


def guided_learned_range(model_fn_batched: ModelFn, guidance_scale) -> ModelFn:
  """`classifier_free_guidance` for a model that also predicts its variance ('learned_range': 2C output channels on
  the last axis, the prediction then the variance value), as diffusers' unCLIP pipelines guide their decoder.

  `model_fn_batched` gets concat([x, x]) and concat([t, t]), conditioned first and unconditioned second (as for
  `classifier_free_guidance`; diffusers orders its batch the other way round). Guidance acts on the prediction only;
  the variance value is the conditional half's.
  """

  def guided(x, t):
    out = model_fn_batched(jnp.concatenate([x, x]), jnp.concatenate([t, t]))
    c = x.shape[-1]
    if out.shape[-1] != 2 * c:
      raise ValueError(f'guided_learned_range needs a model output of 2 x {c} channels, got {out.shape[-1]}')
    cond, uncond = jnp.split(out, 2)
    prediction = uncond[..., :c] + guidance_scale * (cond[..., :c] - uncond[..., :c])
    return jnp.concatenate([prediction, cond[..., c:]], axis=-1)

  return guided
