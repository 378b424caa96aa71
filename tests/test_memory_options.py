"""Memory options by config: rematerialisation policies leave losses, gradients and parameter names alone while
keeping fewer activations; gradient accumulation through the real trainer equals one full batch in less memory;
bfloat16 compute trains with float32 parameters, optimizer state and loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import emoji_vae, mnist_clip, mnist_dit
from diffusion_jax.config import ConfigError
from diffusion_jax.models import remat, tracing, unet, vae
from diffusion_jax.train.task import get_task
from diffusion_jax.train import accumulate
from diffusion_jax.train.trainer import Trainer


def _batch(n, size, channels=1, text_len=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (n, size, size, channels)).astype(np.float32),
          "tokens": rng.integers(1, 10, (n, text_len)).astype(np.int32),
          "label": (np.arange(n) % 10).astype(np.int32), "valid": np.ones((n,), np.float32)}


def _random_like(abstract):
  """Random parameters of the model's shapes (no init to compile); DiT's zero-initialised gates would otherwise
  give its blocks zero gradients."""
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), abstract)


def _residual_bytes(loss, params, batch) -> int:
  """Bytes the backward pass keeps from the forward pass: the leaves of the vjp closure, without computing it."""
  residuals = jax.eval_shape(lambda p, b: jax.vjp(lambda q: loss(q, b), p)[1], params, batch)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))


# XLA:CPU deletes the optimisation barriers that keep a rematerialised forward pass apart, early enough that common-
# subexpression elimination merges the recomputation back into the forward pass: on CPU remat saves nothing.
# XLA:GPU and TPU drop the barriers only after scheduling. Keeping them here compiles what an accelerator would run,
# so the recomputation really happens (and the equalities below test it) and the memory it saves shows.
KEEP_REMAT = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def _by_policy(config, batch) -> dict:
  """Per remat policy: the loss and gradients at one set of parameters, the parameter names, the bytes of saved
  residuals and the compiled program's temporary memory."""
  out, params = {}, None
  batch = jax.tree.map(jnp.asarray, batch)
  for policy in remat.POLICIES:
    config.model.remat = policy
    task = get_task(config)
    model = tracing.abstract_model(lambda: task.build_model(nnx.Rngs(0)))
    graphdef, abstract, rest = nnx.split(model, nnx.Param, ...)
    if params is None:
      params = _random_like(abstract)

    def loss(p, b):
      return task.loss(nnx.merge(graphdef, p, rest), b, jax.random.key(0))[0]

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile(KEEP_REMAT)
    value, grads = compiled(params, batch)
    out[policy] = dict(loss=float(value), grads=grads, names=jax.tree.structure(abstract),
                       residual_bytes=_residual_bytes(loss, params, batch),
                       temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
  return out


@pytest.fixture(scope="module")
def dit_policies():
  return _by_policy(mnist_dit.get_config("tiny"), _batch(8, 16))


@pytest.fixture(scope="module")
def clip_policies():
  return _by_policy(mnist_clip.get_config("tiny"), _batch(16, 28))


@pytest.mark.parametrize("family", ["dit", "clip"])
def test_remat_policies_give_the_same_loss_gradients_and_parameter_names(family, request):
  runs = request.getfixturevalue(f"{family}_policies")
  ref = runs["none"]
  for policy in ("full", "dots_saveable"):
    got = runs[policy]
    assert got["names"] == ref["names"], policy  # checkpoints and pretrained weights load under any policy
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6, err_msg=policy)
    for g, r in zip(jax.tree.leaves(got["grads"]), jax.tree.leaves(ref["grads"])):
      # Recomputation may fuse differently: float32 rounding apart, gradients of order 1 agree to ~1e-7.
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=policy)


@pytest.mark.parametrize("family", ["dit", "clip"])
def test_remat_policies_keep_fewer_activations(family, request):
  """What each policy makes the backward pass keep: everything, the weight matmuls' outputs, the block inputs."""
  saved = {p: run["residual_bytes"] for p, run in request.getfixturevalue(f"{family}_policies").items()}
  assert saved["none"] > saved["dots_saveable"] > saved["full"], saved


def _tiny_unet(policy):
  return unet.UNet2DConditionModel(unet.UNetConfig(
      in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, attention_levels=(False, True),
      num_attention_heads=2, cross_attention_dim=None, norm_num_groups=4, remat=policy), rngs=nnx.Rngs(0))


def _tiny_vae(policy):
  return vae.AutoencoderKL(vae.vae_config("tiny", in_channels=1, out_channels=1, remat=policy), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("build, apply", [
    (_tiny_unet, lambda model, x: model(x, jnp.zeros(x.shape[0]))),
    (_tiny_vae, lambda model, x: model(x)[0]),
], ids=["unet", "vae"])
def test_remat_reaches_unet_and_vae_blocks(build, apply):
  images = jnp.zeros((4, 16, 16, 1), jnp.float32)  # closed over by the loss: concrete, not abstract
  saved = {}
  for policy in ("none", "full"):
    graphdef, params = nnx.split(tracing.abstract_model(lambda: build(policy)))
    saved[policy] = _residual_bytes(lambda p, x: jnp.mean(apply(nnx.merge(graphdef, p), x) ** 2), params, images)
  assert saved["full"] < saved["none"], saved


def test_full_remat_needs_less_compiled_temporary_memory(dit_policies):
  temp = {p: run["temp_bytes"] for p, run in dit_policies.items()}
  assert temp["full"] < temp["none"], temp


def test_unknown_remat_policy_is_a_config_error_naming_the_choices():
  config = mnist_dit.get_config("tiny")
  config.model.remat = "some"
  with pytest.raises(ConfigError, match="model.remat must be one of none, full, dots_saveable; got 'some'"):
    get_task(config).denoiser_config()
  config = mnist_clip.get_config("tiny")
  config.model.remat = "everything"
  with pytest.raises(ConfigError, match="model.remat must be one of none, full, dots_saveable"):
    get_task(config)


# ------------------------------------------------------------------------------------------ gradient accumulation
ACCUM_BATCH = 16


def _accum_config(steps: int):
  """A tiny deterministic VAE (posterior mean, no GAN), plain SGD at a constant rate: parameters after a step are a
  linear function of the gradients, so equal parameters mean equal gradients."""
  c = emoji_vae.get_config("tiny")
  c.vae.sample_posterior = False
  c.optim.update(name="sgd", b1=0.0, lr=0.5, schedule="constant", warmup_steps=0, grad_clip=0.0)
  c.ema.enabled = False
  c.data.image_size = 16
  c.mesh.shape = (4, 1, 1)  # micro-batches of 4 examples, one on each device
  c.train.update(batch_size=ACCUM_BATCH, grad_accum_steps=steps)
  return c


@pytest.fixture(scope="module")
def accum_runs():
  batch = _batch(ACCUM_BATCH, 16, channels=3, seed=1)
  # Padding rows (valid 0) spread unevenly over the micro-batches (rows k, k+4, ...): 3, 2, 3 and 4 valid examples.
  batch["valid"][[0, 1, 2, 5]] = 0.0
  runs = {}
  for steps in (1, 4):
    trainer = Trainer(_accum_config(steps), "/nonexistent")
    state = trainer.init_state()
    start = jax.device_get(state.params)  # before the step donates the state's buffers
    host = {k: batch[k] for k in ("image", "valid")}
    global_batch = trainer.to_global(host)
    step = trainer.compile_train_step({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                                       for k, v in global_batch.items()})
    state, metrics = step(state, trainer.init_frozen(), global_batch)
    runs[steps] = dict(start=start, params=jax.device_get(state.params), metrics=jax.device_get(metrics),
                       temp_bytes=step.memory_analysis().temp_size_in_bytes, flops=trainer.step_flops)
  return runs


def test_accumulated_micro_batches_update_parameters_like_one_batch(accum_runs):
  full, accum = accum_runs[1], accum_runs[4]
  for key in ("loss", "rec_loss", "kl", "psnr", "grad_norm"):
    np.testing.assert_allclose(accum["metrics"][key], full["metrics"][key], rtol=1e-5, err_msg=key)
  moved = [np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(full["start"]))]
  assert max(moved) > 1e-3  # the step did move the parameters (else equality proves nothing)
  for a, b in zip(jax.tree.leaves(accum["params"]), jax.tree.leaves(full["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_step_flops_count_every_micro_batch(accum_runs):
  # XLA's cost analysis counts the scan body once; the trainer's FLOPs per step (perf/flops_per_sec) must not.
  full, accum = accum_runs[1]["flops"], accum_runs[4]["flops"]
  assert full > 0 and accum == pytest.approx(full, rel=0.15), (full, accum)


def test_accumulation_weighs_micro_batches_by_valid_examples_and_sums_counts():
  """A weighted-mean loss of the tasks' form over uneven padding: means are the full batch's, counts are totals,
  and mutable state (here: rows seen) passes from one micro-batch to the next."""
  def loss_fn(w, seen, batch, rng):
    del rng
    v = batch["valid"]
    err = jnp.sum(v * (batch["x"] @ w - batch["y"]) ** 2) / jnp.maximum(jnp.sum(v), 1.0)
    metrics = {"count/skipped_examples": jnp.sum(1.0 - v), "mean_y": jnp.sum(v * batch["y"]) / jnp.sum(v)}
    return err, (metrics, seen + v.shape[0])

  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.standard_normal((12, 3)), jnp.float32),
           "y": jnp.asarray(rng.standard_normal(12), jnp.float32),
           "valid": jnp.asarray([0, 0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1], jnp.float32), "step": jnp.int32(7)}
  w, key = jnp.asarray([0.5, -1.0, 2.0]), jax.random.key(0)
  (ref, (ref_metrics, _)), ref_grad = jax.value_and_grad(loss_fn, has_aux=True)(w, 0, batch, key)
  # Micro-batches take rows k, k+3, ...: the first holds two padding rows, the second one, the third none.
  (got, (metrics, seen)), grad = jax.jit(accumulate.value_and_grad(loss_fn, 3))(w, jnp.int32(0), batch, key)
  assert int(seen) == 12  # three micro-batches of 4 rows, one after the other
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-6)
  np.testing.assert_allclose(metrics["mean_y"], ref_metrics["mean_y"], rtol=1e-6)
  assert float(metrics["count/skipped_examples"]) == 3.0


def test_accumulation_needs_less_compiled_temporary_memory(accum_runs):
  assert accum_runs[4]["temp_bytes"] < accum_runs[1]["temp_bytes"], (accum_runs[4]["temp_bytes"],
                                                                       accum_runs[1]["temp_bytes"])


@pytest.mark.parametrize("steps, mesh, message", [
    (3, (4, 1, 1), "train.batch_size=16 must split into train.grad_accum_steps=3 micro-batches"),
    (4, (8, 1, 1), "micro-batches whose size is a multiple of the 8 batch shards"),
    (0, (4, 1, 1), "train.grad_accum_steps must be >= 1"),
])
def test_indivisible_accumulation_is_a_config_error(steps, mesh, message):
  config = _accum_config(steps)
  config.mesh.shape = mesh
  with pytest.raises(ConfigError, match=message):
    Trainer(config, "/nonexistent")


def test_contrastive_task_refuses_accumulation():
  config = mnist_clip.get_config("tiny")
  config.train.grad_accum_steps = 2
  with pytest.raises(ConfigError, match="grad_accum_steps > 1 would contrast each micro-batch only with itself"):
    get_task(config)


# ------------------------------------------------------------------------------------------ mixed precision
def test_bfloat16_compute_trains_with_float32_parameters_optimizer_state_and_loss():
  config = mnist_dit.get_config("tiny")
  config.model.compute_dtype = "bfloat16"
  config.optim.warmup_steps = 0
  trainer = Trainer(config, "/nonexistent")
  task = trainer.task
  images = jax.eval_shape(lambda: task.build_model(nnx.Rngs(0)).denoiser.dit(
      jnp.zeros((2, 16, 16, 1)), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32)))
  assert images.dtype == jnp.bfloat16  # the model really computes in bfloat16

  state = trainer.init_state()
  start_params = jax.device_get(state.params)
  batch = trainer.to_global(_batch(8, 16))
  step = trainer.compile_train_step({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                                     for k, v in batch.items()})
  losses = []
  for _ in range(2):
    state, metrics = step(state, trainer.init_frozen(), batch)
    assert metrics["loss"].dtype == jnp.float32
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)), losses
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state, state.ema))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  moved = [np.max(np.abs(np.asarray(a) - b)) for a, b in zip(jax.tree.leaves(state.params),
                                                             jax.tree.leaves(start_params))]
  assert max(moved) > 0
