"""ODE/SDE solvers in sigma space: Euler, Euler-ancestral, Heun, DPM-Solver++(2M) and flow-matching Euler.

These are diffusers' `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `HeunDiscreteScheduler`,
`DPMSolverMultistepScheduler` (dpmsolver++, order 2) and `FlowMatchEulerDiscreteScheduler`, written as the step
functions of `samplers.run_chain` (see `samplers.py` for the loop and the public `sample`).

The bridge to our DDPM-parameterised models. A model trained on x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps (the
"VP" x) is a model of x_0 + sigma eps (the "VE" x that k-diffusion integrates) with sigma = sqrt((1 - abar) / abar),
because x_VP = x_VE / sqrt(sigma^2 + 1): that division is diffusers' `scale_model_input`. So the Euler family keeps
its state in VE form, exactly diffusers' `prev_sample`, and calls `model_fn(x / sqrt(sigma^2 + 1), t)`; DPM-Solver++
works on x_VP itself, as diffusers' does. The model's time t is the training step that has this sigma, interpolated
in log sigma between integer steps where Karras sigmas or 'linspace' spacing fall between them: model_fn must take
float t (sinusoidal embeddings do). A flow model is called with t = sigma * num_train_timesteps, as diffusers does.

Per-step tables (sigmas, model time steps, solver orders) are built once per chain, in float64 numpy as diffusers
does when the schedule is concrete, and in jnp float32 when it is traced (a schedule passed into `jax.jit`), so that
both work; the step functions read one row of them per scan iteration and never sync with the host.
"""
import jax
import jax.numpy as jnp
import numpy as np

# Karras et al.'s rho, fixed in diffusers and k-diffusion alike.
_KARRAS_RHO = 7.0
FINAL_SIGMAS = ('zero', 'sigma_min')


def _xp(array):
  """numpy for concrete arrays (diffusers' float64 arithmetic), jnp when `array` is traced."""
  return jnp if isinstance(array, jax.core.Tracer) else np


def draw_noise(source, x):
  """One step's standard normal noise shaped like x: drawn from `source` when it is a PRNG key, `source` itself
  when `samplers.run_chain` was given the chain's noise explicitly (`step_noise`, one float row per step)."""
  if jnp.issubdtype(source.dtype, jnp.floating):
    return source.astype(x.dtype)
  return jax.random.normal(source, x.shape, x.dtype)


def _time_vector(x, t, dtype):
  return jnp.full((x.shape[0],), t, dtype=dtype)


def karras_sigmas(sigma_min, sigma_max, num_steps: int):
  """Karras et al. (2022) eq. 5: num_steps sigmas from sigma_max down to sigma_min, uniform in sigma^(1/rho).

  Works on numpy or (traced) jnp extremes alike.
  """
  ramp = np.linspace(0, 1, num_steps)
  min_inv, max_inv = sigma_min ** (1 / _KARRAS_RHO), sigma_max ** (1 / _KARRAS_RHO)
  return (max_inv + ramp * (min_inv - max_inv)) ** _KARRAS_RHO


def sigma_to_t(sigma, log_sigmas, xp=np):
  """The (fractional) training step whose sigma is `sigma`: linear interpolation in log sigma, as diffusers."""
  log_sigma = xp.log(xp.maximum(sigma, 1e-10))
  dists = log_sigma[None, :] - log_sigmas[:, None]
  low = xp.minimum(xp.argmax(xp.cumsum(dists >= 0, axis=0), axis=0), log_sigmas.shape[0] - 2)
  lo, hi = log_sigmas[low], log_sigmas[low + 1]
  w = xp.clip((lo - log_sigma) / (lo - hi), 0, 1)
  return (1 - w) * low + w * (low + 1)


def _interp_steps(t, table, xp):
  """np.interp(t, arange(T), table) for t in [0, T - 1], without jnp.interp's searchsorted (a second scan)."""
  if xp is np:  # np.interp's float64 arithmetic
    t, table = np.asarray(t, np.float64), np.asarray(table, np.float64)
  last = table.shape[0] - 1
  low = xp.clip(xp.floor(t), 0, last - 1).astype(np.int32)
  value = table[low] + (t - low) * (table[low + 1] - table[low])
  return xp.where(t >= last, table[last], value)


def _train_sigmas(alphas_cumprod):
  # float32 like diffusers' torch tables, whatever the arithmetic after.
  xp = _xp(alphas_cumprod)
  a = alphas_cumprod if xp is jnp else np.asarray(alphas_cumprod, np.float32)
  return xp, ((1 - a) / a) ** 0.5


def _check_steps(num_train: int, num_steps: int):
  if not 1 <= num_steps <= num_train:
    raise ValueError(f'num_steps must be in [1, {num_train}], got {num_steps}')


def _check_final(final_sigmas_type):
  if final_sigmas_type not in FINAL_SIGMAS:
    raise ValueError(f'unknown final_sigmas_type {final_sigmas_type!r}; expected one of {FINAL_SIGMAS}')


def _as_arrays(xp, tables):
  """float32 (and int32) jnp arrays from a table computed in either namespace."""
  def convert(v):
    v = v if xp is jnp else np.asarray(v)
    if jnp.issubdtype(v.dtype, jnp.bool_):
      return jnp.asarray(v, jnp.bool_)
    if jnp.issubdtype(v.dtype, jnp.integer):
      return jnp.asarray(v, jnp.int32)
    return jnp.asarray(v, jnp.float32)
  return {k: convert(v) for k, v in tables.items()}


# ------------------------------------------------------------------------------------ Euler, Euler-a, Heun tables


def euler_timesteps(num_train: int, num_steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
  """The float32 time steps of diffusers' Euler/Heun `set_timesteps`; 'linspace' ones are fractional."""
  _check_steps(num_train, num_steps)
  if spacing == 'linspace':
    return np.linspace(0, num_train - 1, num_steps, dtype=np.float32)[::-1].copy()
  if spacing == 'leading':
    steps = (np.arange(num_steps) * (num_train // num_steps)).round()[::-1].astype(np.float32)
    return steps + steps_offset
  if spacing == 'trailing':
    return np.arange(num_train, 0, -num_train / num_steps).round().astype(np.float32) - 1
  raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of ('leading', 'trailing', 'linspace')")


def euler_chain(alphas_cumprod, num_steps: int, *, spacing: str = 'leading', steps_offset: int = 0,
                use_karras_sigmas: bool = False, final_sigmas_type: str = 'zero') -> dict:
  """sigmas [n + 1] (ending at 0 or the smallest training sigma), float model time steps [n] and init_noise_sigma.

  Karras sigmas span the sigmas the spaced time steps reach (diffusers' choice for Euler and Heun), and their
  time steps are interpolated back from the training sigmas.
  """
  _check_final(final_sigmas_type)
  num_train = alphas_cumprod.shape[0]
  timesteps = euler_timesteps(num_train, num_steps, spacing, steps_offset)
  xp, train = _train_sigmas(alphas_cumprod)
  sigmas = _interp_steps(timesteps, train, xp)
  if use_karras_sigmas:
    sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_steps)
    timesteps = sigma_to_t(sigmas, xp.log(train), xp)
  last = train[:1] if final_sigmas_type == 'sigma_min' else xp.zeros(1)
  sigmas = xp.concatenate([sigmas, last]).astype(np.float32)
  sigma_max = xp.max(sigmas)
  # Pipelines multiply a standard normal by this: x_VE = sigma_max noise, or for 'leading' x_VP = noise.
  init = sigma_max if spacing in ('linspace', 'trailing') else (sigma_max**2 + 1) ** 0.5
  return _as_arrays(xp, {'sigmas': sigmas, 'timesteps': timesteps, 'init_noise_sigma': init})


# ------------------------------------------------------------------------------------ DPM-Solver++ tables


def dpm_timesteps(num_train: int, num_steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
  """Integer time steps of DPMSolverMultistepScheduler: n + 1 points with the last (t = 0) dropped."""
  _check_steps(num_train, num_steps)
  if spacing == 'linspace':
    steps = np.linspace(0, num_train - 1, num_steps + 1).round()[::-1][:-1]
  elif spacing == 'leading':
    steps = (np.arange(num_steps + 1) * (num_train // (num_steps + 1))).round()[::-1][:-1] + steps_offset
  elif spacing == 'trailing':
    steps = np.arange(num_train, 0, -num_train / num_steps).round() - 1
  else:
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of ('leading', 'trailing', 'linspace')")
  return steps.astype(np.int64)


def dpm_chain(alphas_cumprod, num_steps: int, *, spacing: str = 'leading', steps_offset: int = 0,
              use_karras_sigmas: bool = False, final_sigmas_type: str = 'zero') -> dict:
  """sigmas [n + 1], integer model time steps [n] and each step's solver order (1 or 2) for DPM-Solver++(2M).

  Karras sigmas here span the whole training range and their time steps are rounded (diffusers truncates them
  instead for squaredcos_cap_v2, an artefact of an int64 cast; we always round). The first step has no history and
  the last is first order whenever it lands on sigma = 0 or the chain is shorter than 15 steps (lower_order_final).
  """
  _check_final(final_sigmas_type)
  num_train = alphas_cumprod.shape[0]
  timesteps = dpm_timesteps(num_train, num_steps, spacing, steps_offset)
  xp, train = _train_sigmas(alphas_cumprod)
  if use_karras_sigmas:
    sigmas = karras_sigmas(train[0], train[-1], num_steps)
    timesteps = xp.round(sigma_to_t(sigmas, xp.log(train), xp)).astype(np.int32)
  else:
    sigmas = _interp_steps(timesteps, train, xp)
  last = train[:1] if final_sigmas_type == 'sigma_min' else xp.zeros(1)
  sigmas = xp.concatenate([sigmas, last]).astype(np.float32)
  order = np.full(num_steps, 2, np.int32)
  order[0] = 1
  if final_sigmas_type == 'zero' or num_steps < 15:
    order[-1] = 1
  return _as_arrays(xp, {'sigmas': sigmas, 'timesteps': timesteps, 'order': order})


# ------------------------------------------------------------------------------------ flow-matching tables


def _shift(sigmas, shift):
  """SD3's resolution shift of flow sigmas, sigma -> s sigma / (1 + (s - 1) sigma)."""
  return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_chain(num_steps: int, *, num_train_timesteps: int = 1000, shift: float = 1.0,
               use_karras_sigmas: bool = False) -> dict:
  """FlowMatchEulerDiscreteScheduler's sigmas [n + 1] (from 1 to 0) and model time steps sigma * T [n].

  As diffusers, the sampling sigmas are spaced between the shifted training extremes and then shifted again: with
  shift != 1 the shift is applied twice to the smallest sigma. Kept for parity; it only moves the last few steps.
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  num = num_train_timesteps
  train = np.linspace(1, num, num, dtype=np.float32)[::-1] / np.float32(num)
  train = _shift(train, np.float32(shift))
  sigma_max, sigma_min = float(train[0]), float(train[-1])
  sigmas = np.linspace(sigma_max * num, sigma_min * num, num_steps) / num
  sigmas = _shift(sigmas, shift)
  if use_karras_sigmas:
    sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_steps)
  sigmas = sigmas.astype(np.float32)
  timesteps = sigmas * np.float32(num)
  return _as_arrays(np, {'sigmas': np.append(sigmas, np.float32(0)), 'timesteps': timesteps})


# ------------------------------------------------------------------------------------ steps


def _ve_x0(model_out, x, sigma, prediction_type, clip_x0):
  """x_0 from a VP-parameterised output, in the VE form x = x_0 + sigma eps (diffusers' Euler formulas)."""
  if prediction_type == 'epsilon':
    x0 = x - sigma * model_out
  elif prediction_type == 'v_prediction':
    x0 = model_out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
  else:
    x0 = model_out
  return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def _ve_denoise(model_fn, x, sigma, timestep, prediction_type, clip_x0):
  """Calls a VP model on a VE state: the input is scaled to x_VP, the time step is passed as float."""
  out = model_fn((x / (sigma**2 + 1) ** 0.5).astype(x.dtype), _time_vector(x, timestep, jnp.float32))
  return _ve_x0(out, x, sigma, prediction_type, clip_x0)


def euler_step(model_fn, x, carry, level, next_level, rng, *, prediction_type, clip_x0):
  """Euler on the probability-flow ODE dx/dsigma = (x - x_0) / sigma (Karras et al. Algorithm 1, no churn).

  Written x_0 + (sigma_next / sigma)(x - x_0), diffusers' x + slope * (sigma_next - sigma) rearranged: from a large
  sigma (the cosine schedule's is 2e4) the latter cancels x against itself and loses ~4 float32 digits.
  """
  del rng
  sigma, sigma_next = level['sigma'], next_level['sigma']
  x0 = _ve_denoise(model_fn, x, sigma, level['timestep'], prediction_type, clip_x0)
  return x0 + (sigma_next / sigma) * (x - x0), carry, x0


def euler_ancestral_step(model_fn, x, carry, level, next_level, rng, *, prediction_type, clip_x0):
  """An Euler step down to sigma_down, then fresh noise back up to sigma_next (k-diffusion's sample_euler_ancestral).

  The noise is `draw_noise(rng, x)`: drawn from this step's key from `run_chain`, or its row of `step_noise`.
  """
  sigma, sigma_next = level['sigma'], next_level['sigma']
  x0 = _ve_denoise(model_fn, x, sigma, level['timestep'], prediction_type, clip_x0)
  sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
  sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
  x_next = x0 + (sigma_down / sigma) * (x - x0)  # the Euler step, arranged as in `euler_step`
  return x_next + draw_noise(rng, x) * sigma_up, carry, x0


def heun_step(model_fn, x, carry, level, next_level, rng, *, prediction_type, clip_x0):
  """Heun's second-order step (Karras et al. Algorithm 1): Euler, then the mean of both ends' slopes.

  The corrector's model call is skipped under `lax.cond` where `level['second_order']` is False, i.e. on the step to
  sigma = 0 whose slope would divide by zero; diffusers takes a plain Euler step there too. Returns the corrector's
  x_0 (diffusers' pred_original_sample after its second half-step), or the predictor's on that last step.
  """
  del rng
  sigma, sigma_next = level['sigma'], next_level['sigma']
  x0 = _ve_denoise(model_fn, x, sigma, level['timestep'], prediction_type, clip_x0)
  slope = (x - x0) / sigma
  dt = sigma_next - sigma
  x_euler = x + slope * dt

  def correct(_):
    x_pred = x_euler.astype(x.dtype)
    x0_next = _ve_denoise(model_fn, x_pred, sigma_next, next_level['timestep'], prediction_type, clip_x0)
    slope_next = (x_pred - x0_next) / sigma_next
    return x + (slope + slope_next) / 2 * dt, x0_next.astype(x0.dtype)

  x_next, x0 = jax.lax.cond(level['second_order'], correct, lambda _: (x_euler, x0), None)
  return x_next, carry, x0


def _vp_alpha_sigma(sigma):
  alpha = 1 / (sigma**2 + 1) ** 0.5
  return alpha, sigma * alpha


def dpmpp_2m_init(x):
  """The carry is the previous step's x_0 prediction (DPM-Solver++'s one step of history)."""
  return jnp.zeros_like(x)


def dpmpp_2m_step(model_fn, x, carry, level, next_level, rng, *, prediction_type, clip_x0):
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, midpoint form) on x_VP, first order where level['order'] == 1.

  Written as x_next = c_x x + c_0 x0 + c_1 (x0 - x0_prev) with scalar coefficients, so that the unused second-order
  term is multiplied by an exact 0 (never inf * 0) on first-order steps, including the step to sigma = 0 where
  lambda = inf.
  """
  del rng
  x0_prev = carry
  alpha_s, sigma_s = _vp_alpha_sigma(level['sigma'])
  alpha_t, sigma_t = _vp_alpha_sigma(next_level['sigma'])
  alpha_p, sigma_p = _vp_alpha_sigma(level['sigma_prev'])
  out = model_fn(x, _time_vector(x, level['timestep'], jnp.int32))
  if prediction_type == 'epsilon':
    x0 = (x - sigma_s * out) / alpha_s
  elif prediction_type == 'v_prediction':
    x0 = alpha_s * x - sigma_s * out
  else:
    x0 = out
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  lambda_s = jnp.log(alpha_s) - jnp.log(sigma_s)
  lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
  lambda_p = jnp.log(alpha_p) - jnp.log(sigma_p)
  h = lambda_t - lambda_s
  second = level['order'] == 2
  r0 = jnp.where(second, (lambda_s - lambda_p) / jnp.where(second, h, 1.0), 1.0)
  c_0 = -alpha_t * (jnp.exp(-h) - 1.0)
  c_1 = jnp.where(second, 0.5 * c_0 / r0, 0.0)
  x_next = (sigma_t / sigma_s) * x + c_0 * x0 + c_1 * (x0 - x0_prev)
  return x_next, x0.astype(x0_prev.dtype), x0


def flow_euler_step(model_fn, x, carry, level, next_level, rng, *, clip_x0):
  """Euler on dx/dsigma = v for x_sigma = (1 - sigma) x_0 + sigma noise and a model of v = noise - x_0."""
  del rng
  sigma, sigma_next = level['sigma'], next_level['sigma']
  v = model_fn(x, _time_vector(x, level['timestep'], jnp.float32))
  x0 = x - sigma * v
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    # Once x_0 is clipped the velocity is the one pointing at it: (x - x0) / sigma, with sigma > 0 on every step.
    v = (x - x0) / sigma
  return x + (sigma_next - sigma) * v, carry, x0
