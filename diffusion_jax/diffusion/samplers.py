"""Reverse-process samplers for Gaussian diffusion, each a step function run under one `lax.scan`.

A sampler is a `Sampler(init, step)`: `init(x_T) -> carry` and `step(model_fn, x, carry, t, t_prev, rng) -> (x_prev,
carry, x0_pred)`. The loop (`run_chain`) scans the step over the static (t, t_prev) pairs, so a whole sampling run
is one compiled program with no host round trip per step. The carry is where multistep solvers (DPM-Solver++ keeps
its last x_0 prediction) keep history, and the step gets `model_fn` rather than one output so that solvers needing
several evaluations per step (Heun) fit the same loop. Add a sampler by adding a builder to `SAMPLERS`.

Time steps follow diffusers' `timestep_spacing` (steps_offset 0) and its `set_alpha_to_one=True`: the step after the
last time step lands on alpha_bar = 1, i.e. on x_0 itself.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import schedules as sched_lib

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
SPACINGS = ('leading', 'trailing', 'linspace')


def sampling_timesteps(num_train_steps: int, num_steps: int, spacing: str = 'leading') -> np.ndarray:
  """The descending int32 time steps a `num_steps` sampler visits, as diffusers' `set_timesteps`.

  'leading' is DDIM's original k * (T // n); 'trailing' ends at T - 1 and so starts from pure noise (see "Common
  Diffusion Noise Schedules and Sample Steps are Flawed", Table 2); 'linspace' spreads n points over [0, T - 1].
  """
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f'num_steps must be in [1, {num_train_steps}], got {num_steps}')
  if spacing == 'leading':
    steps = np.arange(num_steps)[::-1] * (num_train_steps // num_steps)
  elif spacing == 'trailing':
    steps = np.round(np.arange(num_train_steps, 0, -num_train_steps / num_steps)) - 1
  elif spacing == 'linspace':
    steps = np.round(np.linspace(0, num_train_steps - 1, num_steps))[::-1]
  else:
    raise ValueError(f'unknown timestep_spacing {spacing!r}; expected one of {SPACINGS}')
  return steps.astype(np.int32)


def _chain(num_train_steps: int, num_steps: int, spacing: str):
  """(t, t_prev) pairs; t_prev = -1 stands for alpha_bar = 1 after the last step.

  t_prev is the next time step of the sequence. diffusers' DDIMScheduler instead uses t - T // n, which is the
  same for 'leading' (and 'trailing' when n divides T) and otherwise steps to a level the chain never visits.
  """
  steps = sampling_timesteps(num_train_steps, num_steps, spacing)
  return steps, np.append(steps[1:], -1).astype(np.int32)


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


class Sampler(NamedTuple):
  """A step function and its carry's initial value; see the module docstring for the signatures."""
  init: Callable[[jax.Array], Any]
  step: Callable[..., tuple]


def _time_vector(x, t):
  return jnp.full((x.shape[0],), t, dtype=jnp.int32)


def _ddim_sampler(schedule, *, eta, prediction_type, clip_x0) -> Sampler:
  # A literal eta = 0 draws no noise at all: cheaper, and bit-identical whatever the rng.
  stochastic = not (isinstance(eta, (int, float)) and eta == 0)

  def step(model_fn, x, carry, t, t_prev, rng):
    out = model_fn(x, _time_vector(x, t))
    noise = jax.random.normal(rng, x.shape, x.dtype) if stochastic else None
    x_prev, x0 = ddim_step(schedule, out, x, t, t_prev, eta=eta, noise=noise, prediction_type=prediction_type,
                           clip_x0=clip_x0)
    return x_prev, carry, x0

  return Sampler(init=lambda x: (), step=step)


def _ddpm_sampler(schedule, *, eta, prediction_type, clip_x0) -> Sampler:
  del eta  # Ancestral sampling has no knob; its variance is the posterior's.

  def step(model_fn, x, carry, t, t_prev, rng):
    out = model_fn(x, _time_vector(x, t))
    noise = jax.random.normal(rng, x.shape, x.dtype)
    x_prev, x0 = ddpm_step(schedule, out, x, t, t_prev, noise=noise, prediction_type=prediction_type,
                           clip_x0=clip_x0)
    return x_prev, carry, x0

  return Sampler(init=lambda x: (), step=step)


SAMPLERS = {'ddim': _ddim_sampler, 'ddpm': _ddpm_sampler}


def run_chain(sampler: Sampler, model_fn: ModelFn, x: jax.Array, timesteps, prev_timesteps, rng,
              return_trajectory: bool = False):
  """Scans `sampler.step` over the (t, t_prev) pairs; x keeps its dtype across steps (a scan carry must)."""
  timesteps = jnp.asarray(timesteps, jnp.int32)
  prev_timesteps = jnp.asarray(prev_timesteps, jnp.int32)
  keys = None if rng is None else jax.random.split(rng, timesteps.shape[0])

  def body(state, inputs):
    x, carry = state
    t, t_prev, key = inputs
    x_prev, carry, x0 = sampler.step(model_fn, x, carry, t, t_prev, key)
    x_prev = x_prev.astype(x.dtype)
    return (x_prev, carry), ({'x': x_prev, 'x0_pred': x0} if return_trajectory else None)

  (x, _), trajectory = jax.lax.scan(body, (x, sampler.init(x)), (timesteps, prev_timesteps, keys))
  return (x, trajectory) if return_trajectory else x


def sample(model_fn: ModelFn, schedule: sched_lib.NoiseSchedule, noise: jax.Array, rng: jax.Array | None, *,
           sampler: str = 'ddim', num_steps: int = 50, eta: float = 0.0, prediction_type: str = 'epsilon',
           clip_x0: bool = True, timestep_spacing: str = 'leading', return_trajectory: bool = False):
  """Runs the reverse process from x_T = `noise` to x_0 in `num_steps` model calls.

  `model_fn(x, t)` gets int32 t of shape [B]. `rng` feeds the per-step noise (unused, and may be None, for DDIM
  with eta = 0). With `return_trajectory`, also returns {'x': x after each step, 'x0_pred': each step's x_0
  estimate}, stacked along a leading [num_steps] axis. Everything but the arrays must be static under jit.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; expected one of {tuple(SAMPLERS)}')
  if prediction_type not in sched_lib.PREDICTION_TYPES:
    raise ValueError(f'unknown prediction_type {prediction_type!r}; expected one of {sched_lib.PREDICTION_TYPES}')
  steps, prev_steps = _chain(schedule.num_timesteps, num_steps, timestep_spacing)
  chosen = SAMPLERS[sampler](schedule, eta=eta, prediction_type=prediction_type, clip_x0=clip_x0)
  if rng is None and (sampler != 'ddim' or not (isinstance(eta, (int, float)) and eta == 0)):
    raise ValueError(f'sampler {sampler!r} with eta={eta} draws noise and needs an rng')
  return run_chain(chosen, model_fn, noise, steps, prev_steps, rng, return_trajectory)


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
