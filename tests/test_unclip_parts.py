"""The unCLIP (DALL-E 2 / Karlo) parts against diffusers on small random models.

PriorTransformer and UnCLIPTextProjModel go through diffusers' `save_pretrained` and our `pretrained.load` with every
parameter perturbed (diffusers starts norms at 1/0 and clip_mean/std at 0, which would hide mix-ups); our prior's
export is loaded back by diffusers. The 'unclip' sampler runs diffusers' UnCLIPScheduler loop, read from its saved
config, with a fixed random linear "model" and the same explicit per-step noise. Criterion: max|ours - ref| /
max|ref| <= 1e-4 in float32.
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel as TorchTextProj  # noqa: E402

from diffusion_jax import pretrained  # noqa: E402
from diffusion_jax.diffusion import samplers, scheduler_config  # noqa: E402
from diffusion_jax.models.prior import PriorConfig, PriorTransformer  # noqa: E402
from diffusion_jax.models.unclip import UnCLIPTextProjModel, guidance_batch  # noqa: E402
from diffusion_jax.pretrained import prior as pprior  # noqa: E402
from diffusion_jax.models.tracing import abstract_model  # noqa: E402
from diffusion_jax.pretrained.weights import WeightsError, assign, read_file  # noqa: E402
from tests.torch_parity import max_rel_err, one_torch_thread, perturbed  # noqa: E402,F401 (autouse fixture)

TOL = 1e-4

PRIORS = {
    # diffusers' unCLIP pipeline test prior: 77 text tokens, text embedding, time, image embedding, prd token.
    "karlo_test": dict(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1),
    # The other options: norms, no prd token (the output is the image embedding token), widths that all differ.
    "options": dict(num_attention_heads=2, attention_head_dim=8, embedding_dim=12, num_layers=2, num_embeddings=6,
                    additional_embeddings=3, norm_in_type="layer", embedding_proj_norm_type="layer",
                    added_emb_type=None, time_embed_dim=20, embedding_proj_dim=10, clip_embed_dim=14,
                    time_embed_act_fn="gelu"),
    # Shap-E's layout: no text tokens, a sequence of image tokens, positions padded for the tokens before them.
    "no_text": dict(num_attention_heads=2, attention_head_dim=4, embedding_dim=8, num_layers=1, num_embeddings=5,
                    additional_embeddings=0, encoder_hid_proj_type=None, added_emb_type=None, norm_in_type="layer",
                    clip_embed_dim=6),
}


def _prior_inputs(kwargs, seed=0, batch=3):
  """Inputs as numpy; the mask has padding at the end (row 0), random holes with the first token masked (row 1), and
  everything real (row 2)."""
  cfg = PriorConfig(**kwargs)
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  inputs = {"timestep": np.array([999, 10, 0][:batch]),
            "proj_embedding": normal(batch, cfg.embedding_proj_dim or cfg.embedding_dim)}
  if cfg.encoder_hid_proj_type:
    n = cfg.num_embeddings
    inputs["hidden_states"] = normal(batch, cfg.embedding_dim)
    inputs["encoder_hidden_states"] = normal(batch, n, cfg.embedding_dim)
    mask = np.ones((batch, n), bool)
    mask[0, n // 2:] = False
    mask[1] = rng.random(n) < 0.5
    mask[1, 0] = False
    inputs["attention_mask"] = mask
  else:
    inputs["hidden_states"] = normal(batch, cfg.num_embeddings, cfg.embedding_dim)
  return inputs


def _run_torch(model, inputs):
  with torch.no_grad():
    return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).predicted_image_embedding.numpy()


def _jitted(model):
  """model(*args, **kwargs) under jit: one compilation instead of one per operation (5 s → 0.7 s for the 77-token
  prior on XLA:CPU)."""
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, args, kwargs: nnx.merge(graphdef, state)(*args, **kwargs))
  return lambda *args, **kwargs: run(state, args, kwargs)


def _run_ours(model, inputs):
  return np.asarray(_jitted(model)(**{k: jnp.asarray(v) for k, v in inputs.items()}))


def _random_model(build, seed=0):
  """A model with every parameter drawn from a numpy rng: no per-initialiser XLA compilation (~0.15 s each here)."""
  model = abstract_model(build)
  rng = np.random.default_rng(seed)
  shapes = {".".join(map(str, p)): v.value.shape for p, v in nnx.state(model, nnx.Param).flat_state()}
  assign(model, {k: (0.3 * rng.standard_normal(shape)).astype(np.float32) for k, shape in shapes.items()})
  nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))
  return model


@pytest.mark.parametrize("name", PRIORS)
def test_prior_matches_diffusers_through_save_and_load(tmp_path, name):
  torch.manual_seed(0)
  ref = perturbed(diffusers.PriorTransformer(**PRIORS[name]))
  ref.save_pretrained(tmp_path)
  ours = pretrained.load(str(tmp_path))
  assert isinstance(ours, PriorTransformer)
  inputs = _prior_inputs(PRIORS[name])
  assert max_rel_err(_run_ours(ours, inputs), _run_torch(ref, inputs)) <= TOL
  if name == "karlo_test":  # diffusers applies no causal mask without a text mask; neither do we
    del inputs["attention_mask"]
    assert max_rel_err(_run_ours(ours, inputs), _run_torch(ref, inputs)) <= TOL
  x = np.random.default_rng(1).standard_normal((2, ours.config.output_dim)).astype(np.float32)
  with torch.no_grad():
    post = ref.post_process_latents(torch.from_numpy(x)).numpy()
  assert max_rel_err(ours.post_process_latents(jnp.asarray(x)), post) <= TOL
  np.testing.assert_allclose(ours.normalize(jnp.asarray(post)), x, rtol=1e-4, atol=1e-4)


def test_our_prior_exports_to_diffusers(tmp_path):
  cfg = PriorConfig(**PRIORS["karlo_test"], num_embeddings=9)
  ours = _random_model(lambda: PriorTransformer(cfg, rngs=nnx.Rngs(0)))
  pprior.save_diffusers_prior(ours, str(tmp_path))
  ref = diffusers.PriorTransformer.from_pretrained(str(tmp_path)).eval()
  inputs = _prior_inputs(dict(PRIORS["karlo_test"], num_embeddings=9), seed=3)
  assert max_rel_err(_run_ours(ours, inputs), _run_torch(ref, inputs)) <= TOL
  x = np.ones((1, cfg.output_dim), np.float32)
  with torch.no_grad():
    post = ref.post_process_latents(torch.from_numpy(x)).numpy()
  assert max_rel_err(ours.post_process_latents(jnp.asarray(x)), post) <= TOL


def test_prior_trains_under_jit():
  kwargs = dict(num_attention_heads=2, attention_head_dim=4, embedding_dim=6, num_layers=1, num_embeddings=3)
  graphdef, state = nnx.split(_random_model(lambda: PriorTransformer(PriorConfig(**kwargs), rngs=nnx.Rngs(0))))
  inputs = {k: jnp.asarray(v) for k, v in _prior_inputs(kwargs, batch=2).items()}

  def loss(state):
    return jnp.mean(nnx.merge(graphdef, state)(**inputs) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(state)
  assert np.isfinite(value) and value > 0
  flat = {".".join(map(str, p)): np.asarray(v.value) for p, v in grads.flat_state()}
  assert all(np.isfinite(g).all() for g in flat.values())
  # The statistics are outside the network: no gradient reaches them.
  assert not flat["clip_mean"].any() and not flat["clip_std"].any()
  assert flat["positional_embedding"].any() and flat["prd_embedding"].any()


def test_loader_defaults_cover_diffusers_and_unknown_fields_are_refused(tmp_path):
  for cls, defaults in ((diffusers.PriorTransformer, pprior.PRIOR_DEFAULTS),
                        (TorchTextProj, pprior.TEXT_PROJ_DEFAULTS)):
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self")
    assert set(params) == set(defaults), cls
    for field, param in params.items():
      want = None if param.default is inspect.Parameter.empty else param.default
      assert want == defaults[field], (cls, field)
  with pytest.raises(WeightsError, match="unsupported field rotary=True") as info:
    pprior.prior_config_from_diffusers({"rotary": True})
  assert "\n" not in str(info.value)
  with pytest.raises(WeightsError, match="time_embed_act_fn 'tanh'"):
    pprior.prior_config_from_diffusers({"time_embed_act_fn": "tanh"})


def test_text_proj_matches_diffusers_with_and_without_guidance(tmp_path):
  torch.manual_seed(0)
  kwargs = dict(clip_extra_context_tokens=3, clip_embeddings_dim=16, time_embed_dim=24, cross_attention_dim=12)
  ref = perturbed(TorchTextProj(**kwargs))
  ref.save_pretrained(tmp_path)
  ours = pretrained.load(str(tmp_path))
  assert isinstance(ours, UnCLIPTextProjModel)
  rng = np.random.default_rng(0)
  b, length = 2, 5
  image = rng.standard_normal((b, 16)).astype(np.float32)
  # Guided: diffusers doubles the image embeddings itself; prompts and token states come [uncond, cond].
  prompt = rng.standard_normal((2 * b, 16)).astype(np.float32)
  states = rng.standard_normal((2 * b, length, 16)).astype(np.float32)
  for guided in (True, False):
    n = 2 * b if guided else b
    with torch.no_grad():
      ref_ctx, ref_time = ref(image_embeddings=torch.from_numpy(image), prompt_embeds=torch.from_numpy(prompt[:n]),
                              text_encoder_hidden_states=torch.from_numpy(states[:n]),
                              do_classifier_free_guidance=guided)
    image_in, drop = guidance_batch(jnp.asarray(image)) if guided else (jnp.asarray(image), None)
    ctx, time = _jitted(ours)(image_in, jnp.asarray(prompt[:n]), jnp.asarray(states[:n]), drop_image=drop)
    assert ctx.shape == (n, 3 + length, 12) and time.shape == (n, 24)
    assert max_rel_err(ctx, ref_ctx.numpy()) <= TOL
    assert max_rel_err(time, ref_time.numpy()) <= TOL
  # The export is the checkpoint we read.
  pprior.save_diffusers_text_proj(ours, str(tmp_path / "export"))
  for name, value in read_file(str(tmp_path / "diffusion_pytorch_model.safetensors")).items():
    np.testing.assert_array_equal(read_file(str(tmp_path / "export" / "diffusion_pytorch_model.safetensors"))[name],
                                  value, err_msg=name)


# ---------------------------------------------------------------------------------------------------- scheduler


class LinearModel:
  """A fixed random channel mix with a time-dependent gain; with learned_range also a variance value in (-1, 1)
  (tanh of a second mix). `cond` adds a bias, so guided and unguided halves differ."""

  def __init__(self, channels, learned_range, seed=0):
    rng = np.random.default_rng(seed)
    out = 2 * channels if learned_range else channels
    self.w = (np.eye(channels, out) + 0.1 * rng.standard_normal((channels, out))).astype(np.float32)
    self.b = (0.1 * rng.standard_normal(out)).astype(np.float32)
    self.c, self.learned_range = channels, learned_range

  def __call__(self, xp, x, t, cond):
    """x [..., C] channels-last, t [B], cond [B]; xp is jnp or torch."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    t = t.reshape(shape) * 1.0
    out = (x @ xp.asarray(self.w) * (0.95 + 0.05 * xp.cos(t / 300))
           + xp.asarray(self.b) * (xp.sin(t / 100) + cond.reshape(shape)))
    if self.learned_range:
      out = xp.concatenate([out[..., :self.c], xp.tanh(out[..., self.c:])], -1)
    return out


def _torch_xp():
  class XP:
    asarray = staticmethod(lambda a: torch.from_numpy(a).double())
    cos, sin, tanh = torch.cos, torch.sin, torch.tanh
    concatenate = staticmethod(torch.cat)
  return XP


def _diffusers_chain(scheduler, model, noise, step_noise, num_steps, guidance_scale, monkeypatch):
  """diffusers' unCLIP loop (prior without guidance, decoder with learned_range guidance), in float64, the state
  channels-first as its scheduler splits channels on dim 1. Returns the state after every step, channels-last."""
  draws = [torch.from_numpy(n).double() for n in step_noise]

  def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
    return to_first(draws.pop(0))

  monkeypatch.setattr(diffusers.schedulers.scheduling_unclip, "randn_tensor", randn_tensor)
  to_first = (lambda a: a.permute(0, 3, 1, 2)) if noise.ndim == 4 else (lambda a: a)
  to_last = (lambda a: a.permute(0, 2, 3, 1)) if noise.ndim == 4 else (lambda a: a)
  xp = _torch_xp()
  scheduler.set_timesteps(num_steps)
  timesteps = scheduler.timesteps
  x = to_first(torch.from_numpy(noise).double())
  states = []
  for i, t in enumerate(timesteps):
    if guidance_scale is None:
      out = model(xp, to_last(x), t.expand(x.shape[0]), torch.ones(x.shape[0], dtype=torch.float64))
    else:  # the unCLIP decoder's guidance: [uncond, cond], guidance on the prediction, the cond half's variance
      both = torch.cat([x, x])
      out = model(xp, to_last(both), t.expand(both.shape[0]), torch.arange(both.shape[0]) >= x.shape[0])
      out = to_first(out)
      uncond, cond = out.chunk(2)
      uncond, _ = uncond.split(x.shape[1], dim=1)
      cond, variance = cond.split(x.shape[1], dim=1)
      out = to_last(torch.cat([uncond + guidance_scale * (cond - uncond), variance], dim=1))
    prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
    x = scheduler.step(to_first(out), t, x, prev_timestep=prev).prev_sample
    states.append(to_last(x).numpy())
  return np.stack(states)


CHAINS = [  # UnCLIPScheduler config, sample shape (channels last), steps, decoder guidance scale
    ({"prediction_type": "sample", "clip_sample_range": 5.0}, (2, 6), 25, None),  # Karlo's prior
    ({"prediction_type": "epsilon"}, (2, 6), 10, None),
    ({"prediction_type": "epsilon", "clip_sample": False}, (2, 6), 7, None),
    ({"variance_type": "learned_range"}, (2, 3, 3, 3), 25, 4.0),  # Karlo's decoder
    ({"variance_type": "learned_range", "prediction_type": "sample"}, (2, 3, 3, 3), 10, None),
]


@pytest.mark.parametrize("config,shape,num_steps,guidance", CHAINS, ids=[str(c[0]) for c in CHAINS])
def test_unclip_sampler_matches_diffusers_every_step(tmp_path, monkeypatch, config, shape, num_steps, guidance):
  diffusers.UnCLIPScheduler(**config).save_pretrained(tmp_path)
  name, options, schedule = scheduler_config.sampler_from_scheduler_config(tmp_path)
  assert name == "unclip"
  model = LinearModel(shape[-1], config.get("variance_type") == "learned_range")
  rng = np.random.default_rng(1)
  noise = rng.standard_normal(shape).astype(np.float32)
  step_noise = rng.standard_normal((num_steps, *shape)).astype(np.float32)
  theirs = _diffusers_chain(diffusers.UnCLIPScheduler.from_pretrained(tmp_path), model, noise, step_noise,
                            num_steps, guidance, monkeypatch)
  if guidance is None:
    model_fn = lambda x, t: model(jnp, x, t, jnp.ones(x.shape[0]))
  else:  # ours: [cond, uncond]
    model_fn = samplers.guided_learned_range(
        lambda x, t: model(jnp, x, t, (jnp.arange(x.shape[0]) < x.shape[0] // 2) * 1.0), guidance)
  _, trajectory = jax.jit(lambda noise, step_noise: samplers.sample(
      model_fn, schedule, noise, None, sampler=name, num_steps=num_steps, step_noise=step_noise,
      return_trajectory=True, **options))(noise, step_noise)
  errors = [max_rel_err(a, b) for a, b in zip(trajectory["x"], theirs)]
  assert max(errors) <= TOL, errors


def test_step_noise_replays_the_rng_of_any_sampler():
  schedule = scheduler_config.sampler_from_scheduler_config({"_class_name": "DDPMScheduler"})[2]
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4)), jnp.float32)
  model_fn = lambda x, t: 0.9 * x
  key = jax.random.key(3)
  drawn = jnp.stack([jax.random.normal(k, x.shape) for k in jax.random.split(key, 3)])
  for sampler, options in (("ddpm", {}), ("euler_ancestral", {"prediction_type": "sample"})):
    with_key = samplers.sample(model_fn, schedule, x, key, sampler=sampler, num_steps=3, **options)
    given = samplers.sample(model_fn, schedule, x, None, sampler=sampler, num_steps=3, step_noise=drawn, **options)
    # The same numbers; XLA may fuse a drawn and a given operand differently (a float32 ulp).
    np.testing.assert_allclose(with_key, given, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="step_noise must be a float array of shape"):
    samplers.sample(model_fn, schedule, x, None, sampler="ddpm", num_steps=4, step_noise=drawn)
  with pytest.raises(ValueError, match="needs an rng or step_noise"):
    samplers.sample(model_fn, schedule, x, None, sampler="unclip", num_steps=3)


@pytest.mark.parametrize("config,field", [
    ({"beta_schedule": "linear"}, "beta_schedule='linear'"),
    ({"variance_type": "learned"}, "variance_type='learned'"),
    ({"prediction_type": "v_prediction"}, "prediction_type='v_prediction'"),
])
def test_unclip_scheduler_config_refuses_what_it_cannot_run(config, field):
  with pytest.raises(ValueError, match=field) as info:
    scheduler_config.sampler_from_scheduler_config({"_class_name": "UnCLIPScheduler", **config})
  assert "\n" not in str(info.value)
