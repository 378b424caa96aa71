"""ViT and CLIP models: shapes, pooling, clip skip, position-embedding interpolation, axis names, variants, jit."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                                       CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModel,
                                       CLIPVisionModelWithProjection, pool_tokens)
from diffusion_jax.models.vit import VARIANTS, interpolate_posemb, vit_config

TEXT = CLIPTextConfig(vocab_size=50, context_length=8, width=32, layers=2, heads=2, mlp_dim=64, pooling="eos",
                      eos_token_id=40, pad_token_id=0)
VISION = vit_config("test/8", image_size=16)
CFG = CLIPConfig(text=TEXT, vision=VISION, embed_dim=16)
IDS = jnp.array([[5, 45, 40, 0, 0, 0], [7, 8, 9, 10, 40, 0]], jnp.int32)  # 45 > eos: argmax would differ
LOGICAL_AXES = {"embed", "mlp", "heads", "vocab", "norm", None}


def random_model(build, seed=0):
  """The model `build()` makes, with random parameters drawn in numpy.

  Initialising through jax compiles one random kernel per parameter shape, which costs seconds per model on a
  CPU; these tests need parameters that are random, not ones drawn by the model's own initialisers.
  """
  graphdef, state = nnx.split(nnx.eval_shape(build))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if x.ndim >= 2:
      value = rng.normal(0, math.prod(x.shape[:-1]) ** -0.5, x.shape)
    else:
      value = rng.normal(0, 0.1, x.shape) + (1.0 if any(getattr(k, "key", None) == "scale" for k in path) else 0.0)
    return jnp.asarray(value, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def run(model, fn, *args):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))(state, *args)


@pytest.fixture(scope="module")
def model():
  return random_model(lambda: CLIPModel(CFG, rngs=nnx.Rngs(0)))


def test_clip_model_under_jit_gives_projected_unnormalised_embeddings(model):
  pixels = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  out = run(model, lambda m, x, i: (m(x, i), m.encode_image(x), m.encode_text(i), m.temperature()), pixels, IDS)
  (img, txt), img2, txt2, temp = out
  assert img.shape == (3, 16) and txt.shape == (2, 16)
  np.testing.assert_array_equal(img, img2)
  np.testing.assert_array_equal(txt, txt2)
  assert not np.allclose(np.linalg.norm(img, axis=-1), 1.0)  # callers normalise; the model does not
  np.testing.assert_allclose(temp, np.exp(np.minimum(model.logit_scale[...], np.log(100))), rtol=1e-6)


def _abstract_models():
  text_only = CLIPTextConfig(vocab_size=20, context_length=8, width=16, layers=1, heads=2, mlp_dim=32)
  siglip = CLIPConfig(text=text_only, vision=vit_config("test/8", image_size=16, pooling="map", pre_norm=False),
                      embed_dim=8, logit_scale_init=math.log(10), logit_bias_init=-10.0)
  builds = {
      "clip": lambda: CLIPModel(CFG, rngs=nnx.Rngs(0)),
      "siglip": lambda: CLIPModel(siglip, rngs=nnx.Rngs(0)),
      "vision_mean": lambda: CLIPVisionModel(vit_config("test/8", image_size=16, pooling="mean"), rngs=nnx.Rngs(0)),
      "text_proj": lambda: CLIPTextModelWithProjection(text_only, 8, rngs=nnx.Rngs(0)),
      "vision_proj": lambda: CLIPVisionModelWithProjection(VISION, 8, rngs=nnx.Rngs(0)),
  }
  return {name: nnx.eval_shape(build) for name, build in builds.items()}


def test_every_parameter_is_a_param_with_logical_axis_names():
  for name, m in _abstract_models().items():
    everything = nnx.state(m).flat_state()
    params = nnx.state(m, nnx.Param).flat_state()
    assert len(everything) == len(params), f"{name} holds non-Param state"
    for path, var in params:
      axes = var.get_metadata().get("out_sharding")
      assert axes is not None and len(axes) == len(var.value.shape), f"{name} {path}: axes {axes}"
      assert set(axes) <= LOGICAL_AXES, f"{name} {path}: unknown logical axes {axes}"
      assert len([a for a in axes if a]) == len({a for a in axes if a}), f"{name} {path} repeats an axis"


def test_initialisation_follows_clip_and_siglip():
  siglip = CLIPConfig(text=CLIPTextConfig(vocab_size=20, context_length=8, width=64, layers=2, heads=2, mlp_dim=128),
                      vision=vit_config("mu/8", image_size=16), embed_dim=32, logit_scale_init=math.log(10),
                      logit_bias_init=-10.0)
  # rbg keys compile far faster than threefry on CPU; the initialisers are the same.
  m = CLIPModel(siglip, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  assert float(m.logit_scale[...]) == pytest.approx(math.log(10))
  assert float(m.logit_bias[...]) == -10.0
  np.testing.assert_array_equal(m.text_model.final_layer_norm.scale[...], 1.0)
  np.testing.assert_array_equal(m.vision_model.layers[0].mlp.fc1.bias[...], 0.0)
  assert np.std(m.text_projection.kernel[...]) == pytest.approx(64 ** -0.5, rel=0.1)
  assert np.std(m.text_model.token_embedding.embedding[...]) == pytest.approx(0.02, rel=0.1)
  default = nnx.eval_shape(lambda: CLIPModel(CFG, rngs=nnx.Rngs(0)))
  assert not hasattr(default, "logit_bias")
  m.logit_scale[...] = jnp.asarray(math.log(1000.0))
  assert float(m.temperature()) == pytest.approx(100.0)  # OpenAI's cap


def test_text_pooling_rules():
  ids = jnp.array([[5, 45, 40, 0, 0], [40, 3, 40, 0, 0], [1, 2, 3, 4, 9]])
  hidden = jnp.broadcast_to(jnp.arange(5, dtype=jnp.float32)[None, :, None], (3, 5, 4))
  picks = lambda pooling: pool_tokens(hidden, ids, CLIPTextConfig(pooling=pooling, eos_token_id=40))[:, 0].tolist()
  assert picks("argmax") == [1, 0, 4]  # the largest id (first of equal ones)
  assert picks("eos") == [2, 0, 0]  # the first EOS; 0 when there is none, as transformers
  assert picks("last_non_pad") == [2, 2, 4]


def test_text_model_is_causal_and_pools_at_eos(model):
  changed = IDS.at[:, 5].set(33)  # after every EOS
  out = run(model, lambda m, a, b: (m.text_model.encode(a), m.text_model(b)), IDS, changed)
  (states, pooled), states_changed = out
  assert states.shape == (2, 6, 32) and pooled.shape == (2, 32)
  np.testing.assert_allclose(states[:, :5], states_changed[:, :5], atol=1e-6)
  assert not np.allclose(states[:, 5], states_changed[:, 5])
  np.testing.assert_array_equal(pooled, states[jnp.arange(2), jnp.array([2, 4])])
  with pytest.raises(ValueError, match="length <= 8"):
    model.text_model(jnp.zeros((1, 9), jnp.int32))


def test_clip_skip(model):
  def fn(m, ids):
    text = m.text_model
    x = text._embed(ids)
    for layer in text.layers[:-1]:
      x = layer(x, is_causal=True)
    return (x, text.final_layer_norm(x), text(ids, skip_last_layers=1, final_norm=False), text(ids, skip_last_layers=1),
            text.encode(ids, skip_last_layers=1, final_norm=False), text.encode(ids))

  penultimate, normed, raw_call, normed_call, (enc_states, enc_pooled), (_, pooled) = run(model, fn, IDS)
  np.testing.assert_allclose(raw_call, penultimate, atol=1e-6)
  np.testing.assert_allclose(normed_call, normed, atol=1e-6)
  np.testing.assert_allclose(enc_states, penultimate, atol=1e-6)
  np.testing.assert_allclose(enc_pooled, pooled, atol=1e-6)  # pooled always from the last layer
  with pytest.raises(ValueError, match="skip_last_layers"):
    model.text_model(IDS, skip_last_layers=2)


@pytest.mark.parametrize("pooling", ["cls", "mean", "map"])
def test_vision_pooling(pooling):
  cfg = vit_config("test/8", image_size=16, pooling=pooling, pre_norm=pooling == "cls")
  m = random_model(lambda: CLIPVisionModel(cfg, rngs=nnx.Rngs(0)))
  assert hasattr(m, "class_embedding") == (pooling == "cls") and hasattr(m, "head") == (pooling == "map")
  assert hasattr(m, "pre_layernorm") == (pooling == "cls")
  tokens = 4 + (pooling == "cls")
  assert m.position_embedding[...].shape == (tokens, 32)
  pixels = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  (hidden, pooled), (skip_hidden, skip_pooled), normed = run(
      m, lambda m, x: (m(x), m(x, skip_last_layers=1), m.post_layernorm(m(x)[0])), pixels)
  assert hidden.shape == (2, tokens, 32) and pooled.shape == (2, 32) and skip_hidden.shape == hidden.shape
  np.testing.assert_allclose(skip_pooled, pooled, atol=1e-6)
  assert not np.allclose(skip_hidden, hidden)
  if pooling == "cls":
    np.testing.assert_allclose(pooled, normed[:, 0], atol=1e-5)
  elif pooling == "mean":
    np.testing.assert_allclose(pooled, normed.mean(axis=1), atol=1e-5)


def test_position_embedding_interpolation():
  posemb = jax.random.normal(jax.random.key(0), (1 + 16, 8))
  assert interpolate_posemb(posemb, 4, (4, 4), 1) is posemb
  bigger = interpolate_posemb(posemb, 4, (6, 3), 1)
  assert bigger.shape == (1 + 18, 8)
  np.testing.assert_array_equal(bigger[0], posemb[0])  # the class token's position is kept
  flat = jnp.concatenate([posemb[:1], jnp.full((16, 8), 0.5)])
  np.testing.assert_allclose(interpolate_posemb(flat, 4, (7, 7), 1)[1:], 0.5, atol=1e-6)
  # A model run at another resolution than it was built for: 24x24 and 24x16 images, patch 8.
  m = random_model(lambda: CLIPVisionModel(VISION, rngs=nnx.Rngs(0)))
  square, wide = run(m, lambda m, a, b: (m(a), m(b)), jnp.ones((1, 24, 24, 3)), jnp.ones((1, 16, 24, 3)))
  assert square[0].shape == (1, 10, 32) and wide[0].shape == (1, 7, 32)
  assert np.all(np.isfinite(square[1])) and np.all(np.isfinite(wide[1]))


def test_variants_table_matches_transformers_parameter_counts():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  b16 = vit_config("B/16", image_size=224)
  assert (b16.width, b16.layers, b16.heads, b16.mlp_dim, b16.patch_size) == (768, 12, 12, 3072, 16)
  for variant, image_size in (("B/32", 224), ("L/14", 336), ("S/16", 224)):
    cfg = vit_config(variant, image_size=image_size)
    ours = nnx.eval_shape(lambda: CLIPVisionModel(cfg, rngs=nnx.Rngs(0)))
    count = sum(math.prod(v.value.shape) for _, v in nnx.state(ours, nnx.Param).flat_state())
    with torch.device("meta"):
      ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
          hidden_size=cfg.width, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
          intermediate_size=cfg.mlp_dim, patch_size=cfg.patch_size, image_size=image_size))
    assert count == sum(p.numel() for p in ref.parameters()), variant
  assert set(VARIANTS) >= {"Ti", "S", "B", "L", "test"}
  assert vit_config("S/32", pooling="map").pooling == "map"
  with pytest.raises(ValueError, match="unknown ViT variant"):
    vit_config("B16")


def test_configs_reject_inconsistent_fields():
  with pytest.raises(ValueError, match="divisible"):
    CLIPTextConfig(width=30, heads=4)
  with pytest.raises(ValueError, match="pooling"):
    CLIPTextConfig(pooling="first")
  with pytest.raises(ValueError, match="act"):
    CLIPVisionConfig(act="relu6")
  with pytest.raises(ValueError, match="multiple of patch_size"):
    CLIPVisionConfig(image_size=30, patch_size=8)


def test_bfloat16_compute_keeps_float32_params():
  cfg = CLIPTextConfig(vocab_size=20, context_length=8, width=16, layers=1, heads=2, mlp_dim=32,
                       dtype=jnp.bfloat16)
  m = random_model(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0)))
  assert m.layers[0].mlp.fc1.kernel[...].dtype == jnp.float32
  states, pooled = run(m, lambda m, i: m.encode(i), jnp.array([[1, 2, 19, 0]]))
  assert states.dtype == jnp.bfloat16 and pooled.shape == (1, 16)
