"""Gaussian diffusion core: schedules, training loss and samplers, checked against diffusers and closed forms."""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_jax.diffusion import objectives, samplers, schedules

T = 1000
SHAPE = (2, 4, 4, 3)  # NHWC
SPACINGS = ('leading', 'trailing', 'linspace')
KINDS = [  # ours, diffusers' name, beta range
    ('linear', 'linear', 1e-4, 2e-2),
    ('scaled_linear', 'scaled_linear', 8.5e-4, 1.2e-2),
    ('cosine', 'squaredcos_cap_v2', 1e-4, 2e-2),
]


@pytest.fixture(scope='module')
def schedule():
  return schedules.NoiseSchedule.create('linear', T)


def _key(seed):
  # rbg rather than the default threefry keys: same API, and XLA:CPU compiles its bit generator ~2x faster, which
  # is most of this file's run time. The compile test below keeps a classic PRNGKey.
  return jax.random.key(seed, impl='rbg')


def _normal(seed, shape=SHAPE):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class LinearModel:
  """A fixed channel-mixing map whose gain depends on t: cheap, deterministic, written once for JAX and torch."""

  def __init__(self, seed=0, channels=SHAPE[-1], scale=0.6):
    rng = np.random.default_rng(seed)
    self.w = (scale * rng.standard_normal((channels, channels))).astype(np.float32)
    self.b = (0.1 * rng.standard_normal(channels)).astype(np.float32)

  def jax(self, x, t):
    gain = 0.5 + t.astype(jnp.float32) / T
    return jnp.einsum('bhwc,cd->bhwd', x, self.w) * gain[:, None, None, None] + self.b

  def torch(self, x, t):
    return torch.einsum('bhwc,cd->bhwd', x, torch.from_numpy(self.w)) * (0.5 + int(t) / T) + torch.from_numpy(self.b)


def oracle_eps(schedule, x0):
  """The epsilon a perfect model would predict if the data were the single point x0."""
  def model_fn(x, t):
    a = schedules.gather(schedule.alphas_cumprod, t, x)
    return (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
  return model_fn


def gaussian_denoiser(schedule, mu, sigma):
  """E[eps | x_t] for data ~ N(mu, sigma^2): the exact minimiser of the epsilon loss, linear in x_t."""
  def model_fn(x, t):
    a = schedules.gather(schedule.alphas_cumprod, t, x)
    return jnp.sqrt(1.0 - a) * (x - jnp.sqrt(a) * mu) / (a * sigma**2 + 1.0 - a)
  return model_fn


# ---------------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize('kind,theirs,beta_start,beta_end', KINDS)
def test_schedule_matches_diffusers(kind, theirs, beta_start, beta_end):
  ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs, beta_start=beta_start, beta_end=beta_end)
  betas = schedules.make_betas(kind, T, beta_start, beta_end)
  assert betas.dtype == np.float64 and betas.shape == (T,)
  np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=1e-6, atol=1e-9)
  ours = schedules.NoiseSchedule.create(kind, T, beta_start, beta_end)
  assert ours.num_timesteps == T and ours.alphas_cumprod.dtype == jnp.float32
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(ours.alphas, ref.alphas.numpy(), rtol=0, atol=1e-7)


def test_cosine_betas_capped_and_unknown_kind_named():
  assert schedules.make_betas('cosine', T).max() == pytest.approx(0.999)
  with pytest.raises(ValueError, match="'linear', 'scaled_linear', 'cosine'"):
    schedules.make_betas('sigmoid', T)


def test_schedule_is_a_pytree_usable_under_jit(schedule):
  leaves = jax.tree_util.tree_leaves(schedule)
  assert len(leaves) == 10 and all(leaf.shape == (T,) for leaf in leaves)
  doubled = jax.jit(lambda s: jax.tree_util.tree_map(lambda v: 2 * v, s))(schedule)
  np.testing.assert_allclose(doubled.betas, 2 * schedule.betas)


def test_q_sample_equals_iterated_forward_process():
  betas = schedules.make_betas('linear', 50, 1e-3, 0.2)
  sched = schedules.NoiseSchedule.from_betas(betas)
  # Exact composition of x_t = sqrt(1 - b_t) x_{t-1} + sqrt(b_t) e_t: mean gain and variance in float64.
  gain, var = 1.0, 0.0
  gains, variances = [], []
  for b in betas:
    gain, var = np.sqrt(1 - b) * gain, (1 - b) * var + b
    gains.append(gain)
    variances.append(var)
  x0 = jnp.asarray(_normal(0, (50, 3)))
  t = jnp.arange(50, dtype=jnp.int32)
  mean = schedules.q_sample(sched, x0, t, jnp.zeros_like(x0))
  std = schedules.q_sample(sched, x0, t, jnp.ones_like(x0)) - mean
  np.testing.assert_allclose(mean, np.asarray(gains)[:, None] * np.asarray(x0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(std, np.broadcast_to(np.sqrt(variances)[:, None], (50, 3)), rtol=1e-5)

  # And Monte Carlo through the actual chain, so a wrong formula is caught even if the algebra above shared it.
  n, x_start = 200_000, 0.7
  rng = np.random.default_rng(1)
  x = np.full(n, x_start)
  for step, b in enumerate(betas):
    x = np.sqrt(1 - b) * x + np.sqrt(b) * rng.standard_normal(n)
    if step in (0, 9, 49):
      tt = jnp.full((1,), step, jnp.int32)
      mu = float(schedules.q_sample(sched, jnp.full((1,), x_start), tt, jnp.zeros(1))[0])
      sd = float(schedules.q_sample(sched, jnp.full((1,), x_start), tt, jnp.ones(1))[0]) - mu
      assert abs(x.mean() - mu) < 5 * sd / np.sqrt(n)
      assert abs(x.std() / sd - 1) < 0.01


def test_q_sample_broadcasts_per_example_t(schedule):
  x0, noise = jnp.asarray(_normal(0)), jnp.asarray(_normal(1))
  t = jnp.array([3, 900], jnp.int32)
  out = schedules.q_sample(schedule, x0, t, noise)
  ref = diffusers.DDPMScheduler(num_train_timesteps=T).add_noise(
      torch.tensor(np.asarray(x0)), torch.tensor(np.asarray(noise)), torch.tensor([3, 900]))
  np.testing.assert_allclose(out, ref.numpy(), atol=2e-6)


def test_q_posterior_matches_diffusers_and_textbook(schedule):
  betas = schedules.make_betas('linear', T)
  abar = np.cumprod(1 - betas)
  ref = diffusers.DDPMScheduler(num_train_timesteps=T, variance_type='fixed_small', clip_sample=False,
                                prediction_type='sample')
  # diffusers derives beta_t as 1 - abar_t / abar_{t-1} in float32, which keeps ~3 digits at t = 1; give it float64
  # tables so that this compares formulas, not roundings (ours are derived in float64, checked against the textbook).
  ref.alphas_cumprod = torch.from_numpy(abar)
  ref.one = torch.tensor(1.0, dtype=torch.float64)
  x0, x_t = _normal(0), _normal(1)
  for t in (0, 1, 17, 500, 999):
    tt = jnp.full((SHAPE[0],), t, jnp.int32)
    mean, var, log_var = schedules.q_posterior(schedule, jnp.asarray(x0), jnp.asarray(x_t), tt)
    abar_prev = abar[t - 1] if t > 0 else 1.0
    text_mean = (np.sqrt(abar_prev) * betas[t] * x0 + np.sqrt(1 - betas[t]) * (1 - abar_prev) * x_t) / (1 - abar[t])
    text_var = (1 - abar_prev) / (1 - abar[t]) * betas[t]
    np.testing.assert_allclose(mean, text_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var).ravel(), text_var, rtol=1e-5, atol=1e-12)
    expected_log = np.log(text_var) if t > 0 else np.log((1 - abar[0]) / (1 - abar[1]) * betas[1])
    np.testing.assert_allclose(np.asarray(log_var).ravel(), expected_log, rtol=1e-5)
    if t > 0:  # diffusers clamps the t = 0 variance to 1e-20
      assert float(ref._get_variance(t)) == pytest.approx(text_var, rel=1e-12)
    # The model predicts x0 itself, so diffusers' step is a draw from the posterior; replay its noise.
    theirs = ref.step(torch.from_numpy(x0), t, torch.from_numpy(x_t), generator=torch.Generator().manual_seed(t))
    their_noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t)).numpy() if t > 0 else 0.0
    ours = mean + jnp.sqrt(var) * their_noise
    np.testing.assert_allclose(ours, theirs.prev_sample.numpy(), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize('prediction_type', schedules.PREDICTION_TYPES)
def test_prediction_conversions_are_consistent(schedule, prediction_type):
  x0, noise = jnp.asarray(_normal(0)), jnp.asarray(_normal(1))
  for t in (5, 300, 999):
    tt = jnp.full((SHAPE[0],), t, jnp.int32)
    x_t = schedules.q_sample(schedule, x0, tt, noise)
    target = schedules.target_for(schedule, x0, noise, tt, prediction_type)
    np.testing.assert_allclose(schedules.predict_x0(schedule, target, x_t, tt, prediction_type), x0, atol=2e-4)
    np.testing.assert_allclose(schedules.predict_eps(schedule, target, x_t, tt, prediction_type), noise, atol=2e-4)
    # All three parameterisations describe the same (x0, eps): the v of one equals diffusers' velocity.
    x0_hat = schedules.predict_x0(schedule, target, x_t, tt, prediction_type)
    eps_hat = schedules.predict_eps(schedule, target, x_t, tt, prediction_type)
    v = schedules.target_for(schedule, x0_hat, eps_hat, tt, 'v_prediction')
    velocity = diffusers.DDPMScheduler(num_train_timesteps=T).get_velocity(
        torch.tensor(np.asarray(x0)), torch.tensor(np.asarray(noise)), torch.full((SHAPE[0],), t))
    np.testing.assert_allclose(v, velocity.numpy(), atol=3e-4)
  with pytest.raises(ValueError, match='v_prediction'):
    schedules.target_for(schedule, x0, noise, tt, 'velocity')


# ---------------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize('prediction_type', schedules.PREDICTION_TYPES)
def test_loss_of_oracle_is_zero(schedule, prediction_type):
  x0 = jnp.asarray(_normal(0, (64, 2, 2, 1)))
  eps_of = oracle_eps(schedule, x0)

  def model_fn(x, t):
    eps = eps_of(x, t)
    return schedules.target_for(schedule, x0, eps, t, prediction_type)

  loss, aux = objectives.diffusion_loss(model_fn, schedule, x0, _key(0),
                                        prediction_type=prediction_type)
  assert float(loss) < 1e-8
  assert aux['loss_per_example'].shape == (64,)
  t = np.asarray(aux['timesteps'])
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() < T and len(np.unique(t)) > 50


def test_loss_of_zero_model_is_the_target_power(schedule):
  x0 = jnp.asarray(_normal(0, (256, 4, 4, 2)))
  loss, aux = objectives.diffusion_loss(lambda x, t: jnp.zeros_like(x), schedule, x0, _key(1))
  assert float(loss) == pytest.approx(1.0, abs=0.02)  # E[eps^2] = 1
  np.testing.assert_allclose(loss, aux['loss_per_example'].mean(), rtol=1e-6)
  assert float(aux['mean_t']) == pytest.approx(float(aux['timesteps'].mean()), rel=1e-6)


def test_loss_weights_mask_examples_and_gradients_flow(schedule):
  x0 = jnp.asarray(_normal(0, (4, 4, 4, 3)))
  weights = jnp.array([1.0, 0.0, 1.0, 0.0])
  model = LinearModel(seed=3)

  def loss_fn(w, data, weights):
    model_fn = lambda x, t: jnp.einsum('bhwc,cd->bhwd', x, w) + model.b
    loss, aux = objectives.diffusion_loss(model_fn, schedule, data, _key(2), weights=weights)
    return loss, aux['loss_per_example']

  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  w0 = jnp.asarray(model.w)
  (loss, per_example), _ = loss_and_grad(w0, x0, weights)
  assert float(loss) == pytest.approx(float(per_example[jnp.array([0, 2])].mean()), rel=1e-6)
  # Garbage in a masked slot (even NaN padding) changes nothing.
  corrupted = x0.at[1].set(jnp.nan).at[3].set(100.0)
  (loss_c, _), grad = loss_and_grad(w0, corrupted, weights)
  assert float(loss_c) == float(loss)
  assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).sum()) > 1e-3
  # A step down the gradient lowers the loss: the gradient is the loss's, not just some finite array.
  assert float(loss_and_grad(w0 - 1e-2 * grad, corrupted, weights)[0][0]) < float(loss)
  # An all-masked batch is a no-op, not a NaN.
  (loss_z, _), grad_z = loss_and_grad(w0, x0, jnp.zeros(4))
  assert float(loss_z) == 0.0 and float(jnp.abs(grad_z).sum()) == 0.0


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction', 'sample'])
def test_min_snr_gamma_weights_each_example_as_hang_et_al(schedule, prediction_type):
  x0 = jnp.asarray(_normal(0, (64, 4, 4, 2)))
  model_fn = lambda x, t: 0.5 * x
  plain, aux = objectives.diffusion_loss(model_fn, schedule, x0, _key(4), prediction_type=prediction_type)
  weighted, aux_w = objectives.diffusion_loss(model_fn, schedule, x0, _key(4), prediction_type=prediction_type,
                                              snr_gamma=5.0)
  t = np.asarray(aux['timesteps'])
  np.testing.assert_array_equal(t, aux_w['timesteps'])
  a = np.asarray(schedule.alphas_cumprod, np.float64)[t]
  snr = a / (1 - a)
  # min(SNR, γ) is the weight on the x_0 error; ε and v errors are x_0 errors scaled by SNR and SNR + 1.
  expected = {'epsilon': np.minimum(snr, 5) / snr, 'v_prediction': np.minimum(snr, 5) / (snr + 1),
              'sample': np.minimum(snr, 5)}[prediction_type]
  assert expected.min() < 0.5 * expected.max()  # the weights differ across the batch, so this test can fail
  np.testing.assert_allclose(float(weighted), np.mean(expected * np.asarray(aux['loss_per_example'])), rtol=1e-5)
  assert float(weighted) != pytest.approx(float(plain), rel=1e-3)


def test_logit_normal_time_sampling_concentrates_on_the_middle_steps(schedule):
  x0 = jnp.zeros((4096, 2, 2, 1))
  zero = lambda x, t: jnp.zeros_like(x)
  T = schedule.num_timesteps
  middle = lambda t: float(np.mean((t >= T // 4) & (t < 3 * T // 4)))
  _, uniform = objectives.diffusion_loss(zero, schedule, x0, _key(5))
  _, logit = objectives.diffusion_loss(zero, schedule, x0, _key(5), time_sampling='logit_normal')
  t = np.asarray(logit['timesteps'])
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() < T
  # P(|N(0, 1)| < logit(3/4) = 1.0986) = 0.728; uniform t puts half of the steps there.
  assert middle(t) == pytest.approx(0.728, abs=0.03) and middle(np.asarray(uniform['timesteps'])) < 0.55
  with pytest.raises(ValueError, match='time_sampling'):
    objectives.diffusion_loss(zero, schedule, x0, _key(5), time_sampling='beta')


# ---------------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize('num_train,num_steps', [(1000, 50), (1000, 7), (10, 10), (100, 3)])
def test_sampling_timesteps_match_diffusers(num_train, num_steps):
  for spacing in SPACINGS:
    ref = diffusers.DDIMScheduler(num_train_timesteps=num_train, timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(num_steps)
    ours = samplers.sampling_timesteps(num_train, num_steps, spacing)
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=spacing)
  with pytest.raises(ValueError, match='num_steps'):
    samplers.sampling_timesteps(num_train, num_train + 1)


def _diffusers_ddim_loop(scheduler, model, x, num_steps, eta=0.0):
  scheduler.set_timesteps(num_steps)
  xs, x0s = [], []
  x = torch.from_numpy(x)
  for t in scheduler.timesteps:
    out = scheduler.step(model.torch(x, t), t, x, eta=eta)
    x = out.prev_sample
    xs.append(x.numpy())
    x0s.append(out.pred_original_sample.numpy())
  return np.stack(xs), np.stack(x0s)


@pytest.mark.parametrize('prediction_type', schedules.PREDICTION_TYPES)
@pytest.mark.parametrize('spacing', ['leading', 'trailing'])
def test_ddim_matches_diffusers_every_step(schedule, prediction_type, spacing):
  model, noise, num_steps = LinearModel(seed=1), _normal(7), 20
  ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule='linear', clip_sample=True,
                                set_alpha_to_one=True, steps_offset=0, prediction_type=prediction_type,
                                timestep_spacing=spacing)
  ref_xs, ref_x0s = _diffusers_ddim_loop(ref, model, noise, num_steps)
  x, traj = samplers.sample(model.jax, schedule, jnp.asarray(noise), None, sampler='ddim', num_steps=num_steps,
                            prediction_type=prediction_type, timestep_spacing=spacing, return_trajectory=True)
  assert traj['x'].shape == (num_steps,) + SHAPE
  # x0 = (x - sqrt(1 - a) eps) / sqrt(a) magnifies float32 rounding by 1/sqrt(a), about 15 at the first trailing
  # step (t = 999), so the prediction gets a looser bound than the trajectory it feeds.
  np.testing.assert_allclose(traj['x0_pred'], ref_x0s, atol=5e-5)
  np.testing.assert_allclose(traj['x'], ref_xs, atol=1e-5)
  np.testing.assert_allclose(x, ref_xs[-1], atol=1e-5)
  assert np.abs(ref_x0s).max() == pytest.approx(1.0)  # clipping was exercised


def test_ddim_eta_step_matches_diffusers_and_eta0_is_deterministic(schedule):
  model, x = LinearModel(seed=2), _normal(3)
  ref = diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=False, steps_offset=0)
  ref.set_timesteps(10)
  variance_noise = _normal(4)
  for t, t_prev in ((900, 800), (100, 0), (0, -1)):
    out = model.torch(torch.from_numpy(x), t)
    theirs = ref.step(out, t, torch.from_numpy(x), eta=0.7, variance_noise=torch.from_numpy(variance_noise))
    ours, _ = samplers.ddim_step(schedule, jnp.asarray(out.numpy()), jnp.asarray(x), t, t_prev, eta=0.7,
                                 noise=jnp.asarray(variance_noise), clip_x0=False)
    np.testing.assert_allclose(ours, theirs.prev_sample.numpy(), atol=1e-5)

  run = jax.jit(lambda rng, eta: samplers.sample(model.jax, schedule, jnp.asarray(x), rng, num_steps=10, eta=eta),
                static_argnums=1)
  a, b = run(_key(0), 0.0), run(_key(1), 0.0)
  np.testing.assert_array_equal(a, b)
  c, d = run(_key(0), 0.5), run(_key(1), 0.5)
  assert float(jnp.abs(c - d).max()) > 1e-3
  with pytest.raises(ValueError, match='needs an rng'):
    samplers.sample(model.jax, schedule, jnp.asarray(x), None, eta=0.5)


def test_ddpm_step_matches_diffusers_strided_and_full_chain(schedule):
  model, x = LinearModel(seed=4), _normal(5)
  for num_steps, pairs in ((20, ((950, 900), (50, 0), (0, -1))), (T, ((999, 998), (400, 399), (1, 0), (0, -1)))):
    ref = diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=True, variance_type='fixed_small')
    ref.set_timesteps(num_steps)
    if num_steps == T:  # see test_q_posterior_matches_diffusers_and_textbook
      ref.alphas_cumprod = torch.from_numpy(np.cumprod(1 - schedules.make_betas('linear', T)))
      ref.one = torch.tensor(1.0, dtype=torch.float64)
    for t, t_prev in pairs:
      out = model.torch(torch.from_numpy(x), t)
      theirs = ref.step(out, t, torch.from_numpy(x), generator=torch.Generator().manual_seed(t)).prev_sample
      noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t)).numpy()
      ours, _ = samplers.ddpm_step(schedule, jnp.asarray(out.numpy()), jnp.asarray(x), t, t_prev,
                                   noise=jnp.asarray(noise))
      np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, err_msg=f'{num_steps} steps, t={t}')
  # With every step taken it is Ho et al.'s sampler: the schedule's own posterior.
  x0 = jnp.clip(jnp.asarray(_normal(6)), -1, 1)
  for t in (999, 400, 1):
    tt = jnp.full((SHAPE[0],), t, jnp.int32)
    mean, _, _ = schedules.q_posterior(schedule, x0, jnp.asarray(x), tt)
    ours, _ = samplers.ddpm_step(schedule, x0, jnp.asarray(x), t, t - 1, prediction_type='sample')
    np.testing.assert_allclose(ours, mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('sampler', ['ddim', 'ddpm'])
def test_oracle_model_samples_its_x0(schedule, sampler):
  x0 = jnp.asarray(np.clip(_normal(8), -0.9, 0.9))
  out = samplers.sample(oracle_eps(schedule, x0), schedule, jnp.asarray(_normal(9)), _key(3),
                        sampler=sampler, num_steps=25, eta=1.0)
  np.testing.assert_allclose(out, x0, atol=1e-5)


def test_ddpm_with_exact_denoiser_samples_the_data_distribution(schedule):
  mu, sigma, n = 0.3, 0.5, 8192
  noise = jnp.asarray(_normal(4, (n, 1)))
  out = samplers.sample(gaussian_denoiser(schedule, mu, sigma), schedule, noise, _key(5),
                        sampler='ddpm', num_steps=T, clip_x0=False)
  assert float(out.mean()) == pytest.approx(mu, abs=4 * sigma / np.sqrt(n))
  assert float(out.std()) == pytest.approx(sigma, rel=0.03)


def test_ddim_converges_to_the_probability_flow_at_first_order(schedule):
  # For data ~ N(mu, sigma^2) the probability-flow ODE has a closed form; DDIM is its first-order solver, so its
  # error must shrink like 1 / num_steps (a wrong coefficient anywhere leaves an O(1) error instead).
  mu, sigma = 0.3, 0.5
  noise = _normal(4, (512, 1))
  abar = np.cumprod(1 - schedules.make_betas('linear', T))
  errors = {}
  for num_steps in (50, 1000):
    a = abar[samplers.sampling_timesteps(T, num_steps)[0]]
    exact = mu + sigma / np.sqrt(a * sigma**2 + 1 - a) * (noise - np.sqrt(a) * mu)
    out = samplers.sample(gaussian_denoiser(schedule, mu, sigma), schedule, jnp.asarray(noise), None,
                          num_steps=num_steps, clip_x0=False)
    errors[num_steps] = np.abs(np.asarray(out) - exact).max()
  assert errors[1000] < 6e-3, errors
  assert 14 < errors[50] / errors[1000] < 26, errors


def test_ddim_inversion_matches_diffusers(schedule):
  model, x0, num_steps = LinearModel(seed=5, scale=0.3), _normal(10), 10
  ref = diffusers.DDIMInverseScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True,
                                       steps_offset=0)
  ref.set_timesteps(num_steps)
  x = torch.from_numpy(x0)
  for t in ref.timesteps:
    x = ref.step(model.torch(x, t), t, x).prev_sample
  ours = samplers.ddim_invert(model.jax, schedule, jnp.asarray(x0), num_steps=num_steps)
  np.testing.assert_allclose(ours, x.numpy(), rtol=1e-5, atol=1e-5)


def test_ddim_inversion_then_sampling_with_the_oracle_returns_x0(schedule):
  x0 = jnp.asarray(np.clip(_normal(11), -0.9, 0.9))
  oracle = oracle_eps(schedule, x0)
  x_T = samplers.ddim_invert(oracle, schedule, x0, num_steps=20)
  np.testing.assert_allclose(samplers.sample(oracle, schedule, x_T, None, num_steps=20), x0, atol=1e-5)


@pytest.mark.parametrize('prediction_type', schedules.PREDICTION_TYPES)
def test_ddim_inversion_round_trip(schedule, prediction_type):
  # The single-image oracle above maps every x_T to x0, so it cannot tell a good inversion from a bad one. The
  # exact denoiser of Gaussian data makes sampling a genuine bijection: plain inversion is off by its one-step lag,
  # and fixed-point refinement must make it the exact inverse of the sampler, in every parameterisation.
  x0 = jnp.asarray(np.clip(_normal(11), -0.9, 0.9))
  eps_fn = gaussian_denoiser(schedule, 0.1, 0.5)

  def denoiser(x, t):
    eps = eps_fn(x, t)
    x0_hat = schedules.predict_x0(schedule, eps, x, t)
    return schedules.target_for(schedule, x0_hat, eps, t, prediction_type)

  @jax.jit
  def round_trip(x0, iters):
    x_T = samplers.ddim_invert(denoiser, schedule, x0, num_steps=20, prediction_type=prediction_type,
                               fixed_point_iters=iters)
    return samplers.sample(denoiser, schedule, x_T, None, num_steps=20, prediction_type=prediction_type,
                           clip_x0=False)

  errors = [float(jnp.abs(round_trip(x0, iters) - x0).max()) for iters in (0, 2, 8)]
  assert errors[0] > 1e-2 and errors[0] > 10 * errors[1] > 100 * errors[2] and errors[2] < 1e-5, errors


# ---------------------------------------------------------------------------------------------------- guidance


def _two_headed(calls):
  cond, uncond = LinearModel(seed=6), LinearModel(seed=7)

  def batched(x, t):
    calls.append(x.shape[0])
    half = x.shape[0] // 2
    return jnp.concatenate([cond.jax(x[:half], t[:half]), uncond.jax(x[half:], t[half:])])

  return batched, cond.jax, uncond.jax


def test_classifier_free_guidance():
  calls = []
  batched, cond, uncond = _two_headed(calls)
  x, t = jnp.asarray(_normal(12)), jnp.array([10, 700], jnp.int32)
  c, u = cond(x, t), uncond(x, t)
  np.testing.assert_allclose(samplers.classifier_free_guidance(batched, 1.0)(x, t), c, atol=1e-6)
  np.testing.assert_allclose(samplers.classifier_free_guidance(batched, 0.0)(x, t), u, atol=1e-6)
  assert calls == [2 * SHAPE[0], 2 * SHAPE[0]]  # one batched call per evaluation
  guided = np.array(u + 7.5 * (c - u))
  np.testing.assert_allclose(samplers.classifier_free_guidance(batched, 7.5)(x, t), guided, rtol=1e-5, atol=1e-5)

  rescaled = samplers.classifier_free_guidance(batched, 7.5, guidance_rescale=0.7)(x, t)
  axes = tuple(range(1, x.ndim))
  ratio = np.std(np.asarray(c), axis=axes, ddof=1, keepdims=True) / np.std(guided, axis=axes, ddof=1, keepdims=True)
  expected = 0.7 * guided * ratio + 0.3 * guided
  np.testing.assert_allclose(rescaled, expected, rtol=1e-5, atol=1e-5)
  from diffusers.guiders.guider_utils import rescale_noise_cfg  # pylint: disable=import-outside-toplevel
  theirs = rescale_noise_cfg(torch.from_numpy(guided), torch.tensor(np.asarray(c)), 0.7)
  np.testing.assert_allclose(rescaled, theirs.numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- compilation


def _count_scans(jaxpr):
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == 'scan'
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _count_scans(sub)
  return count


@pytest.mark.parametrize('sampler', ['ddim', 'ddpm'])
def test_sampler_is_one_compiled_scan(schedule, sampler):
  model = LinearModel(seed=8)
  calls = []
  guided = samplers.classifier_free_guidance(_two_headed(calls)[0], 3.0)

  def run(sched, noise, rng):
    return samplers.sample(guided, sched, noise, rng, sampler=sampler, num_steps=10, eta=0.5)

  noise, rng = jnp.asarray(_normal(13)), jax.random.PRNGKey(6)
  compiled = jax.jit(run).lower(schedule, noise, rng).compile()
  assert len(calls) == 1  # the model is traced once, inside the scan body, not once per step
  assert _count_scans(jax.make_jaxpr(run)(schedule, noise, rng).jaxpr) == 1
  np.testing.assert_allclose(compiled(schedule, noise, rng), run(schedule, noise, rng), atol=1e-5)
  inverse = lambda sched, x: samplers.ddim_invert(model.jax, sched, x, num_steps=10)
  assert _count_scans(jax.make_jaxpr(inverse)(schedule, noise).jaxpr) == 1
  jax.jit(inverse).lower(schedule, noise).compile()
