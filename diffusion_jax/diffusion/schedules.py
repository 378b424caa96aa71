"""Gaussian (DDPM) noise schedules and the closed-form algebra of the forward process.

Everything a loss or a sampler needs to know about the noise process lives here: the betas, the cumulative
products, the forward marginal q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), and the conversions between what
a network predicts (epsilon, v or x_0; diffusers' names) and the quantities samplers work with.

Tables are derived in float64 numpy and stored as float32 so that a schedule built here equals diffusers' to float32
rounding, and so that 1 - alphas_cumprod near t = 0 does not lose its few significant digits.
"""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ('linear', 'scaled_linear', 'cosine')
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')

# The cosine schedule's cap; diffusers' betas_for_alpha_bar default. Without it the last beta is 1 and x_0 cannot
# be recovered from x_T at all.
_COSINE_MAX_BETA = 0.999
_COSINE_OFFSET = 0.008


def make_betas(kind: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> np.ndarray:
  """Per-step noise variances beta_t, t = 0..T-1, as float64.

  'scaled_linear' is linear in sqrt(beta) (Stable Diffusion's schedule); 'cosine' is Nichol & Dhariwal's
  alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), equal to diffusers' 'squaredcos_cap_v2', and ignores
  beta_start/beta_end.
  """
  if num_timesteps < 1:
    raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}')
  if kind == 'linear':
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  if kind == 'scaled_linear':
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
  if kind == 'cosine':
    def alpha_bar(s):
      return np.cos((s + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * math.pi / 2) ** 2
    steps = np.arange(num_timesteps, dtype=np.float64)
    ratio = alpha_bar((steps + 1) / num_timesteps) / alpha_bar(steps / num_timesteps)
    return np.minimum(1.0 - ratio, _COSINE_MAX_BETA)
  raise ValueError(f'unknown beta schedule {kind!r}; expected one of {BETA_SCHEDULES}')


@flax.struct.dataclass
class NoiseSchedule:
  """Lookup tables of a discrete-time Gaussian diffusion, all float32 [T].

  A pytree of arrays, so it can be an argument of a jitted function (no retrace per schedule) and be sharded or
  replicated like any other state. T itself is the static shape, hence `num_timesteps` is a Python int under jit.
  """
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @classmethod
  def create(cls, kind: str = 'linear', num_timesteps: int = 1000, beta_start: float = 1e-4,
             beta_end: float = 2e-2) -> 'NoiseSchedule':
    return cls.from_betas(make_betas(kind, num_timesteps, beta_start, beta_end))

  @classmethod
  def from_betas(cls, betas) -> 'NoiseSchedule':
    """Builds the tables from any betas (e.g. a checkpoint's `trained_betas`)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 1:
      raise ValueError(f'betas must be a non-empty vector, got shape {betas.shape}')
    if np.any(betas <= 0) or np.any(betas >= 1):
      raise ValueError('betas must lie in (0, 1): the posterior and x_0 prediction divide by 1 - alphas_cumprod')
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # The posterior variance at t = 0 is exactly 0; its log is replaced by the t = 1 value (Ho et al.'s
    # convention) so that learned-variance interpolation in log space stays finite.
    clipped = posterior_variance.copy()
    if clipped.size > 1:
      clipped[0] = clipped[1]
    posterior_log_variance_clipped = np.log(np.maximum(clipped, 1e-20))
    tables = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    )
    return cls(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()})


def gather(values: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
  """values[t] shaped [B, 1, ..., 1] to broadcast against `like` [B, ...].

  JAX clamps out-of-range gathers instead of failing, so callers must keep t in [0, T).
  """
  t = jnp.asarray(t)
  return values[t].reshape(t.shape + (1,) * (like.ndim - t.ndim))


def q_sample(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """A draw of x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with the given standard normal noise."""
  a = gather(schedule.sqrt_alphas_cumprod, t, x0)
  s = gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0)
  return (a * x0 + s * noise).astype(x0.dtype)


def q_posterior(schedule: NoiseSchedule, x0: jax.Array, x_t: jax.Array, t: jax.Array):
  """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), each broadcastable to x_t."""
  mean = (gather(schedule.posterior_mean_coef1, t, x_t) * x0
          + gather(schedule.posterior_mean_coef2, t, x_t) * x_t)
  variance = gather(schedule.posterior_variance, t, x_t)
  log_variance = gather(schedule.posterior_log_variance_clipped, t, x_t)
  return mean, variance, log_variance


def _check_prediction_type(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f'unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}')


def x0_and_eps(model_output: jax.Array, x_t: jax.Array, alpha_bar: jax.Array, prediction_type: str):
  """(x_0, epsilon) implied by a model output at noise level alpha_bar (broadcastable to x_t).

  Takes alpha_bar rather than t so that samplers can also use the "alpha_bar = 1" level before t = 0 and
  strided chains; `predict_x0` / `predict_eps` are the t-indexed front doors.
  """
  _check_prediction_type(prediction_type)
  sqrt_a = jnp.sqrt(alpha_bar)
  sqrt_b = jnp.sqrt(1.0 - alpha_bar)
  if prediction_type == 'epsilon':
    eps = model_output
    x0 = (x_t - sqrt_b * eps) / sqrt_a
  elif prediction_type == 'sample':
    x0 = model_output
    eps = (x_t - sqrt_a * x0) / sqrt_b
  else:  # v = sqrt(abar) eps - sqrt(1 - abar) x_0, a rotation of (x_0, eps), so its inverse is the transpose.
    x0 = sqrt_a * x_t - sqrt_b * model_output
    eps = sqrt_a * model_output + sqrt_b * x_t
  return x0, eps


def predict_x0(schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array,
               prediction_type: str = 'epsilon') -> jax.Array:
  return x0_and_eps(model_output, x_t, gather(schedule.alphas_cumprod, t, x_t), prediction_type)[0]


def predict_eps(schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array,
                prediction_type: str = 'epsilon') -> jax.Array:
  return x0_and_eps(model_output, x_t, gather(schedule.alphas_cumprod, t, x_t), prediction_type)[1]


def output_for(x0: jax.Array, eps: jax.Array, alpha_bar: jax.Array, prediction_type: str) -> jax.Array:
  """The model output that `x0_and_eps` reads as (x0, eps) at noise level alpha_bar: its inverse."""
  _check_prediction_type(prediction_type)
  if prediction_type == 'epsilon':
    return eps
  if prediction_type == 'sample':
    return x0
  return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * x0


def target_for(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
               prediction_type: str = 'epsilon') -> jax.Array:
  """What a network trained with `prediction_type` should output for x_t = q_sample(x0, t, noise)."""
  return output_for(x0, noise, gather(schedule.alphas_cumprod, t, x0), prediction_type)
