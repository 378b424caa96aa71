"""U-Net and text encoder: shapes, conditioning paths, and logical axis names on every parameter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models.text import TextEncoder, TextEncoderConfig
from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig

TINY = UNetConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                  attention_levels=(False, True), num_attention_heads=2, cross_attention_dim=12, norm_num_groups=4,
                  num_class_embeds=10, pooled_dim=12, use_linear_projection=True)


@pytest.fixture(scope="module", params=["default", "scale_shift"])
def unet_apply(request):
  import dataclasses
  model = UNet2DConditionModel(dataclasses.replace(TINY, resnet_time_scale_shift=request.param), rngs=nnx.Rngs(0))
  out_features = model.down_blocks[0].resnets[0].time_emb_proj.kernel[...].shape[1]
  assert out_features == 8 * (2 if request.param == "scale_shift" else 1)  # FiLM needs a scale and a shift
  graphdef, state = nnx.split(model)
  # Zero-initialised output layers would hide conditioning; perturb every parameter a little.
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  state = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

  @jax.jit
  def apply(x, t, ctx, labels, pooled):
    return nnx.merge(graphdef, state)(x, t, ctx, class_labels=labels, pooled=pooled)

  return model, apply


def _inputs(seed=0, b=2):
  k = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(k[0], (b, 16, 16, 1)), jnp.array([10, 500][:b]), jax.random.normal(k[1], (b, 5, 12)),
          jnp.array([3, 7][:b]), jax.random.normal(k[2], (b, 12)))


def test_unet_output_shape_and_every_conditioning_path_matters(unet_apply):
  _, apply = unet_apply
  x, t, ctx, labels, pooled = _inputs()
  base = apply(x, t, ctx, labels, pooled)
  assert base.shape == x.shape and bool(jnp.all(jnp.isfinite(base)))
  for changed in (apply(x, t, ctx + 1.0, labels, pooled),       # cross-attention on text states
                  apply(x, t, ctx, (labels + 1) % 10, pooled),  # class embedding
                  apply(x, t, ctx, labels, pooled + 1.0),       # pooled text embedding
                  apply(x, t + 100, ctx, labels, pooled)):      # time step
    assert float(jnp.max(jnp.abs(changed - base))) > 1e-4


def test_unet_examples_are_independent(unet_apply):
  """Batch elements never mix: changing example 1 leaves example 0's output unchanged."""
  _, apply = unet_apply
  x, t, ctx, labels, pooled = _inputs()
  a = apply(x, t, ctx, labels, pooled)
  b = apply(x.at[1].add(1.0), t, ctx.at[1].add(1.0), labels, pooled)
  np.testing.assert_allclose(a[0], b[0], atol=1e-5)
  assert float(jnp.max(jnp.abs(a[1] - b[1]))) > 1e-4


def test_every_parameter_has_logical_axis_names(unet_apply):
  model, _ = unet_apply
  text = TextEncoder(TextEncoderConfig(width=16, layers=1, heads=2, max_len=8), rngs=nnx.Rngs(0))
  for m in (model, text):
    for path, var in nnx.state(m, nnx.Param).flat_state():
      axes = var.get_metadata().get("out_sharding")
      assert axes is not None and len(axes) == var[...].ndim, f"{path} has no logical axes"


def test_unet_rejects_mismatched_attention_levels():
  with pytest.raises(ValueError, match="attention_levels"):
    UNet2DConditionModel(UNetConfig(block_out_channels=(8, 16), attention_levels=(True,), norm_num_groups=4),
                         rngs=nnx.Rngs(0))


def test_text_encoder_is_causal_and_pools_at_end_of_text():
  cfg = TextEncoderConfig(vocab_size=20, width=16, layers=1, heads=2, max_len=8)
  enc = TextEncoder(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.array([[1, 5, 6, 2, 0, 0, 0, 0], [1, 5, 7, 8, 2, 0, 0, 0]])
  states, pooled = jax.jit(lambda t: enc(t))(tokens)
  assert states.shape == (2, 8, 16) and pooled.shape == (2, 16)
  np.testing.assert_allclose(pooled[0], states[0, 3], atol=1e-6)  # the end-of-text position
  np.testing.assert_allclose(pooled[1], states[1, 4], atol=1e-6)
  np.testing.assert_allclose(states[0, :2], states[1, :2], atol=1e-5)  # causal: same prefix, same states
  with pytest.raises(ValueError, match="max_len"):
    enc(jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("field,value", [("layers_per_block", (1, 2, 1)), ("num_attention_heads", (2,)),
                                         ("transformer_layers_per_block", (1, 1, 1)), ("up_attention_levels", (True,))])
def test_unet_rejects_per_level_settings_of_the_wrong_length(field, value):
  import dataclasses
  with pytest.raises(ValueError, match=f"{field} has {len(value)} entries for 2 levels"):
    UNet2DConditionModel(dataclasses.replace(TINY, **{field: value}), rngs=nnx.Rngs(0))


def test_unet_variants_are_stable_diffusion_sizes():
  from diffusion_jax.models.unet import variant
  assert variant("sd15").cross_attention_dim == 768 and variant("sd2").heads_at(3) == 20
  assert variant("sd2", in_channels=9).in_channels == 9  # the 2.x inpainting U-Net
  with pytest.raises(ValueError, match="unknown U-Net variant 'sdxl'"):
    variant("sdxl")


def test_fast_model_tracing_builds_the_same_model_and_restores_jax():
  from jax._src.interpreters import partial_eval as pe
  from diffusion_jax.models import tracing
  original = pe.DynamicJaxprTracer._origin_msg
  build = lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  init = lambda: nnx.state(build())
  with tracing.fast_model_tracing():
    with tracing.fast_model_tracing():  # nests
      assert pe.DynamicJaxprTracer._origin_msg is not original
    assert pe.DynamicJaxprTracer._origin_msg is not original
    fast = jax.jit(init)()
  assert pe.DynamicJaxprTracer._origin_msg is original
  np.testing.assert_array_equal(fast["kernel"][...], jax.jit(init)()["kernel"][...])
  abstract = tracing.abstract_model(build)
  assert abstract.kernel.get_value().shape == (3, 4)
  assert isinstance(abstract.kernel.get_value(), jax.ShapeDtypeStruct)
