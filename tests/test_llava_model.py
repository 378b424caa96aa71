"""The vision–language model: image features land on the image tokens in order, the configured layer and tokens
are the ones read, and cached generation equals recomputing the whole sequence."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models.decoder import DecoderConfig
from diffusion_jax.models.llava import LlavaConfig, LlavaModel
from diffusion_jax.models.vit import CLIPVisionConfig

VISION = CLIPVisionConfig(image_size=16, patch_size=4, channels=1, width=24, layers=3, heads=2, mlp_dim=48)
TEXT = DecoderConfig(vocab_size=40, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=48, act="silu", gated_mlp=True,
                     norm="rms", positions="rope", qkv_bias=False, out_bias=False, tie_embeddings=False)
IMAGE = 3


def _model(**overrides):
  return LlavaModel(LlavaConfig(vision=VISION, text=TEXT, image_token_id=IMAGE, **overrides), rngs=nnx.Rngs(0))


def _prompt(n_image, before=(1, 7), after=(9, 11, 12)):
  return np.asarray([list(before) + [IMAGE] * n_image + list(after)], np.int32)


def test_image_features_replace_the_placeholders_in_order():
  model = _model()
  pixels = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 1)).astype(np.float32)
  ids = _prompt(16)
  emb = np.asarray(model.embed(jnp.asarray(ids), pixels))
  feats = np.asarray(model.image_features(pixels))
  assert feats.shape == (1, 16, 32)  # 4×4 patches; 'default' drops the class token
  np.testing.assert_allclose(emb[0, 2:18], feats[0], rtol=1e-6)
  text = np.asarray(model.language_model.embed_tokens(jnp.asarray(ids)))
  np.testing.assert_array_equal(emb[0, [0, 1, 18, 19, 20]], text[0, [0, 1, 18, 19, 20]])


def test_feature_layer_and_select_read_what_they_say():
  model = _model(feature_layer=-2, feature_select="full")
  assert model.config.num_image_tokens == 17 and model.config.skip_last_layers == 1
  pixels = np.zeros((1, 16, 16, 1), np.float32)
  states, _ = model.vision_model(pixels, skip_last_layers=1)
  np.testing.assert_allclose(model.image_features(pixels), model.projector(states), rtol=1e-6)
  with pytest.raises(ValueError, match="feature_layer -4 does not name one of the vision tower's 3 blocks"):
    LlavaConfig(vision=VISION, text=TEXT, image_token_id=IMAGE, feature_layer=-4)
  with pytest.raises(ValueError, match="image_token_id 40 is outside"):
    LlavaConfig(vision=VISION, text=TEXT, image_token_id=40)


def test_cached_generation_equals_recomputing_the_sequence():
  model = _model()
  pixels = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  ids = np.concatenate([_prompt(16), _prompt(16, before=(1, 5))])
  out = model.generate(ids, pixels, max_new_tokens=6)
  assert out.shape == (2, ids.shape[1] + 6) and out.dtype == np.int32
  np.testing.assert_array_equal(out[:, :ids.shape[1]], ids)
  logits = model(jnp.asarray(out[:, :-1]), pixels)
  np.testing.assert_array_equal(np.argmax(logits[:, ids.shape[1] - 1:], -1), out[:, ids.shape[1]:])
