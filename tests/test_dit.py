"""DiT: parity with diffusers' DiTTransformer2DModel, adaLN-Zero init, conditioning, axes and loading errors."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax import pretrained
from diffusion_jax.models.dit import DiT, DiTConfig, dit_config, sincos_pos_embed_2d
from diffusion_jax.pretrained.dit import save_diffusers_dit
from diffusion_jax.pretrained.weights import WeightsError

try:  # only the parity tests need the PyTorch reference
  import diffusers
  import torch
except ImportError:
  diffusers = torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch and diffusers")

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def _build(cfg: DiTConfig, seed: int = 0, randomize: float = 0.0) -> DiT:
  """A DiT; `randomize > 0` replaces every parameter with noise of that std, because the zero-initialised adaLN
  layers would otherwise hide every bug. The noise comes from numpy: one jax.random program per shape would
  compile for longer than these tests run."""
  model = DiT(cfg, rngs=nnx.Rngs(seed))
  if randomize:
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
      if isinstance(var, nnx.Param):
        var.value = jnp.asarray(randomize * rng.standard_normal(var.value.shape), var.value.dtype)
  return model


def _jit(model: DiT):
  """`model(...)` compiled as one program, the way training and sampling run it."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, *args, **kw: nnx.merge(graphdef, state)(*args, **kw))
  return lambda *args, **kw: fn(state, *args, **kw)


def _torch_dit(seed: int, *, tie_embedders: bool = False, **kw):
  torch.manual_seed(seed)
  model = diffusers.DiTTransformer2DModel(**kw).eval()
  with torch.no_grad():
    for i, p in enumerate(model.parameters()):
      p.normal_(std=0.05 + 0.15 * (i % 4) / 3)
    if tie_embedders:  # what converted DiT checkpoints look like: one embedder copied into every block
      first = model.transformer_blocks[0].norm1.emb.state_dict()
      for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)
  return model


def _compare(tmp_path, torch_model, x_nchw, t, labels):
  torch_model.save_pretrained(str(tmp_path))
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x_nchw), torch.from_numpy(t), torch.from_numpy(labels)).sample.numpy()
  model = pretrained.load(str(tmp_path))
  out = _jit(model)(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(labels))
  out = np.asarray(out).transpose(0, 3, 1, 2)
  assert out.shape == ref.shape
  return model, float(np.abs(out - ref).max() / np.abs(ref).max())


# (diffusers kwargs, input spatial size, whether to tie the per-block embedders, timesteps)
PARITY_CASES = {
    "p2-latent-sigma": (dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                             num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10), 8, False,
                        np.array([3, 999], np.int64)),
    "p4-gray-nosigma": (dict(num_attention_heads=4, attention_head_dim=8, in_channels=1, out_channels=None,
                             num_layers=3, sample_size=16, patch_size=4, num_embeds_ada_norm=5, norm_eps=1e-6), 16,
                        False, np.array([0.5, 250.25], np.float32)),
    "p2-rgb-shared-embedder": (dict(num_attention_heads=3, attention_head_dim=8, in_channels=3, out_channels=6,
                                    num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=7), 8, True,
                               np.array([17, 401], np.int64)),
    "p2-larger-than-trained": (dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10), 12, False,
                               np.array([5, 600], np.int64)),
}


@needs_torch
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_with_diffusers(tmp_path, case):
  kw, size, tie, t = PARITY_CASES[case]
  torch_model = _torch_dit(len(case), tie_embedders=tie, **kw)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, kw["in_channels"], size, size)).astype(np.float32)
  labels = np.array([1, kw["num_embeds_ada_norm"]], np.int64)  # a real class and the null class
  model, rel = _compare(tmp_path, torch_model, x, t, labels)
  print(f"{case}: max rel error {rel:.2e}")
  assert rel <= 1e-4
  assert model.config.per_block_embedding == (not tie)
  assert model.config.learn_sigma == (kw["out_channels"] == 2 * kw["in_channels"])


@needs_torch
def test_save_diffusers_dit_round_trips_through_diffusers(tmp_path):
  model = _build(DiTConfig(**TINY), randomize=0.2)
  save_diffusers_dit(model, str(tmp_path))
  ref_model = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path)).eval()
  x = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
  t, labels = np.array([10, 900]), np.array([3, 10])
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    torch.from_numpy(labels)).sample.numpy().transpose(0, 2, 3, 1)
  out = np.asarray(_jit(model)(jnp.asarray(x), jnp.asarray(t), jnp.asarray(labels)))
  assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


@needs_torch
def test_pos_embed_matches_diffusers_on_non_square_grids():
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  ref = get_2d_sincos_pos_embed(24, (3, 5), base_size=4).numpy()
  np.testing.assert_allclose(sincos_pos_embed_2d(24, 3, 5, base_size=4), ref, atol=1e-6)


@pytest.mark.parametrize("conditioning", [None, "cross_attention", "joint_attention"])
def test_fresh_model_predicts_exactly_zero(conditioning):
  text = dict(context_dim=12, conditioning=conditioning) if conditioning else {}
  model = _build(DiTConfig(**TINY, **text))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  ctx = jnp.ones((2, 5, 12)) if conditioning else None
  out = _jit(model)(x, jnp.array([1.0, 500.0]), jnp.array([0, 3]), context=ctx)
  assert out.shape == (2, 8, 8, 8)
  assert not np.any(np.asarray(out))


def test_blocks_start_as_identity():
  """adaLN-Zero gates are zero at init, so each block (cross-attention included) passes its input through."""
  model = _build(DiTConfig(**TINY, context_dim=12))
  h = jax.random.normal(jax.random.key(1), (2, 16, 32))
  c = jax.random.normal(jax.random.key(2), (2, 32))
  np.testing.assert_array_equal(jax.jit(model.transformer_blocks[0].__call__)(h, c, jnp.ones((2, 5, 12))), h)


def test_null_class_is_the_default_label():
  cfg = DiTConfig(**TINY)
  model = _build(cfg, randomize=0.1)
  assert model.emb.class_embedder.embedding.value.shape == (cfg.num_classes + 1, cfg.hidden_size)
  apply = _jit(model)
  x, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 4)), jnp.array([3, 40])
  default = apply(x, t)
  np.testing.assert_array_equal(default, apply(x, t, jnp.full((2,), cfg.num_classes)))
  assert float(jnp.abs(default - apply(x, t, jnp.array([0, 0]))).max()) > 1e-3


def test_unconditional_model_has_no_label_table():
  model = _build(DiTConfig(**{**TINY, "num_classes": 0}), randomize=0.1)
  assert model.emb.class_embedder is None
  out = _jit(model)(jnp.ones((1, 8, 8, 4)), jnp.array([7]))
  assert out.shape == (1, 8, 8, 8) and bool(jnp.all(jnp.isfinite(out)))


@pytest.fixture(scope="module")
def text_models():
  """Randomised cross- and joint-attention DiTs, each with a compiled forward + vector-Jacobian product."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  t, labels = jnp.array([10.0, 500.0]), jnp.array([1, 2])
  models = {}
  for conditioning in ("cross_attention", "joint_attention"):
    model = _build(DiTConfig(**TINY, context_dim=12, conditioning=conditioning), seed=3, randomize=0.1)
    graphdef, state = nnx.split(model)

    def apply_and_grad(ctx, graphdef=graphdef, state=state):
      out, vjp = jax.vjp(lambda c: nnx.merge(graphdef, state)(x, t, labels, context=c), ctx)
      return out, vjp(out)[0]  # the gradient of sum(out**2)/2 with respect to the context

    models[conditioning] = (model, jax.jit(apply_and_grad))
  return models


@pytest.mark.parametrize("conditioning", ["cross_attention", "joint_attention"])
def test_text_conditioning_responds_to_context(text_models, conditioning):
  _, apply_and_grad = text_models[conditioning]
  ctx = jax.random.normal(jax.random.key(1), (2, 5, 12))
  out, grad = apply_and_grad(ctx)
  assert out.shape == (2, 8, 8, 8)
  assert float(jnp.abs(grad).max()) > 1e-6
  # Each example's output depends on its own context only.
  changed, _ = apply_and_grad(ctx.at[1].add(1.0))
  np.testing.assert_allclose(changed[0], out[0], atol=1e-6)
  assert float(jnp.abs(changed[1] - out[1]).max()) > 1e-4


def test_cross_and_joint_attention_differ(text_models):
  ctx = jax.random.normal(jax.random.key(1), (2, 5, 12))
  paths = {name: {".".join(map(str, p)) for p, _ in nnx.state(m, nnx.Param).flat_state()}
           for name, (m, _) in text_models.items()}
  assert "transformer_blocks.1.attn2.key.kernel" in paths["cross_attention"]
  assert not any("attn2" in p for p in paths["joint_attention"])
  assert "context_embedder.kernel" in paths["joint_attention"]
  cross, _ = text_models["cross_attention"][1](ctx)
  joint, _ = text_models["joint_attention"][1](ctx)
  assert float(jnp.abs(cross - joint).max()) > 1e-3


def test_context_must_match_config():
  model = nnx.eval_shape(lambda: DiT(DiTConfig(**TINY), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="no context"):
    model(jnp.ones((1, 8, 8, 4)), jnp.array([1]), context=jnp.ones((1, 2, 3)))
  text_model = nnx.eval_shape(lambda: DiT(DiTConfig(**TINY, context_dim=12), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="pass context"):
    text_model(jnp.ones((1, 8, 8, 4)), jnp.array([1]))


def test_every_parameter_has_logical_axis_names():
  for cfg in (DiTConfig(**TINY, context_dim=12, per_block_embedding=True),
              DiTConfig(**TINY, context_dim=12, conditioning="joint_attention")):
    for path, var in nnx.state(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))), nnx.Param).flat_state():
      axes = var.get_metadata().get("out_sharding")
      assert axes is not None and len(axes) == var.value.ndim, f"{path} has no logical axes"
      named = [a for a in axes if a is not None]
      assert len(named) == len(set(named)), f"{path} repeats a logical axis: {axes}"
      assert set(named) <= {"embed", "mlp", "heads", "norm", "vocab"}, f"{path}: {axes}"


def test_named_variants():
  cfg = dit_config("XL/2")
  assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (1152, 28, 16, 2)
  assert (cfg.output_channels, cfg.num_classes) == (8, 1000)
  assert dit_config("S/8", in_channels=1, learn_sigma=False).output_channels == 1
  assert (dit_config("B/4").hidden_size, dit_config("L/8").depth) == (768, 24)
  abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  n = sum(v.value.size for _, v in nnx.state(abstract, nnx.Param).flat_state())
  # DiT-XL/2's released checkpoint counts 675,129,632, its fixed position table (256 × 1152) included.
  assert n + 256 * 1152 == 675_129_632
  with pytest.raises(ValueError, match="unknown DiT variant"):
    dit_config("XXL/2")


@pytest.fixture
def saved_tiny(tmp_path):
  """A diffusers-layout DiT folder written by our exporter (no torch needed)."""
  save_diffusers_dit(_build(DiTConfig(**TINY), randomize=0.1), str(tmp_path))
  return tmp_path


def _rewrite_weights(folder, edit):
  from safetensors.numpy import load_file, save_file
  path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
  state = load_file(path)
  edit(state)
  save_file(state, path)


def test_missing_weight_is_an_error(saved_tiny):
  _rewrite_weights(saved_tiny, lambda s: s.pop("transformer_blocks.1.attn1.to_k.weight"))
  with pytest.raises(WeightsError, match="transformer_blocks.1.attn1.to_k.weight"):
    pretrained.load(str(saved_tiny))


def test_mismatched_weight_is_an_error(saved_tiny):
  def edit(s):
    s["proj_out_2.bias"] = s["proj_out_2.bias"][:-1].copy()
  _rewrite_weights(saved_tiny, edit)
  with pytest.raises(WeightsError, match="proj_out_2.bias"):
    pretrained.load(str(saved_tiny))


def test_unused_weight_is_an_error(saved_tiny):
  def edit(s):
    s["transformer_blocks.0.norm2.weight"] = np.ones(32, np.float32)
  _rewrite_weights(saved_tiny, edit)
  with pytest.raises(WeightsError, match="does not use"):
    pretrained.load(str(saved_tiny))


@pytest.mark.parametrize("field,value", [("norm_type", "ada_norm"), ("activation_fn", "geglu"),
                                         ("norm_elementwise_affine", True), ("attention_bias", False)])
def test_unsupported_config_names_the_field(saved_tiny, field, value):
  path = os.path.join(saved_tiny, "config.json")
  with open(path) as f:
    config = json.load(f)
  config[field] = value
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(WeightsError, match=field):
    pretrained.load(str(saved_tiny))


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  cfg = DiTConfig(**TINY, context_dim=12, conditioning="joint_attention")
  model = _build(cfg, randomize=0.1)
  low = _build(dataclasses.replace(cfg, dtype=jnp.bfloat16))
  nnx.update(low, nnx.state(model))
  assert all(v.value.dtype == jnp.float32 for _, v in nnx.state(low, nnx.Param).flat_state())
  x, ctx = jax.random.normal(jax.random.key(0), (2, 8, 8, 4)), jax.random.normal(jax.random.key(1), (2, 5, 12))
  ref = _jit(model)(x, jnp.array([3, 40]), jnp.array([1, 2]), context=ctx)
  out = _jit(low)(x, jnp.array([3, 40]), jnp.array([1, 2]), context=ctx)
  assert out.dtype == jnp.bfloat16
  assert float(jnp.abs(out.astype(jnp.float32) - ref).max() / jnp.abs(ref).max()) < 0.05
