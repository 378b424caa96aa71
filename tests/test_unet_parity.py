"""Numeric parity with diffusers' `UNet2DConditionModel` on small random models, through the public loader.

Each diffusers model is built from the config fields Stable Diffusion 1.x/2.x use, every parameter is perturbed
(diffusers starts norms at 1/0, which would hide a scale/bias mix-up), saved with `save_pretrained`, loaded with
`pretrained.load`, and run on the same inputs. Criterion: max|ours - ref| / max|ref| <= 1e-4 in float32.
Full-size SD 1.5 / 2.1 structure is checked shape-for-shape without allocating weights.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusion_jax import pretrained  # noqa: E402
from diffusion_jax.models.tracing import abstract_model  # noqa: E402
from diffusion_jax.models.unet import UNet2DConditionModel, UNetConfig, variant  # noqa: E402
from diffusion_jax.pretrained import unet as punet  # noqa: E402
from diffusion_jax.pretrained.weights import (WeightsError, assign, model_arrays, read_file,  # noqa: E402
                                              save_safetensors)
from tests.torch_parity import max_rel_err, one_torch_thread, perturbed  # noqa: E402,F401 (autouse fixture)

TOL = 1e-4
CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

# name: (diffusers constructor arguments, image size, text length)
CONFIGS = {
    # SD 1.x style: legacy attention_head_dim=8 means 8 heads everywhere; 1x1-conv projections; a plain last level.
    "sd1_heads_conv": (dict(block_out_channels=(32, 64), layers_per_block=2, down_block_types=(CA_DOWN, DOWN),
                            up_block_types=(UP, CA_UP), attention_head_dim=8, cross_attention_dim=24,
                            norm_num_groups=8), 16, 7),
    # SD 2.x style: per-block head counts giving 8-wide heads, linear projections, two transformer layers.
    "sd2_headdims_linear": (dict(block_out_channels=(16, 32, 48), layers_per_block=1,
                                 down_block_types=(CA_DOWN, CA_DOWN, DOWN), up_block_types=(UP, CA_UP, CA_UP),
                                 attention_head_dim=(2, 4, 6), use_linear_projection=True,
                                 transformer_layers_per_block=2, cross_attention_dim=20, norm_num_groups=8), 16, 5),
    # Inpainting-style 9 input channels, per-level resnet and transformer counts, no mid block, and an image size
    # that is not a multiple of 4 (diffusers then forwards the skip sizes to its upsamplers).
    "inpaint_per_level_odd": (dict(in_channels=9, out_channels=4, block_out_channels=(16, 32, 32),
                                   layers_per_block=(1, 2, 1), transformer_layers_per_block=(1, 2, 1),
                                   down_block_types=(CA_DOWN, CA_DOWN, CA_DOWN), up_block_types=(CA_UP, CA_UP, CA_UP),
                                   mid_block_type=None, attention_head_dim=4, cross_attention_dim=16,
                                   norm_num_groups=4), 10, 6),
    # Time-embedding options and up/down paths that differ in where attention sits.
    "time_options_asymmetric": (dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=(CA_DOWN, DOWN),
                                     up_block_types=(CA_UP, UP), attention_head_dim=2, cross_attention_dim=8,
                                     norm_num_groups=4, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
                                     time_embedding_dim=48, resnet_time_scale_shift="scale_shift"), 8, 4),
}


def _saved_diffusers_unet(tmp_path, kwargs, seed=0):
  torch.manual_seed(seed)
  ref = perturbed(diffusers.UNet2DConditionModel(**kwargs), seed)
  folder = str(tmp_path / "unet")
  ref.save_pretrained(folder)
  return ref, folder


def _inputs(in_channels, size, text_len, text_dim, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((2, size, size, in_channels)).astype(np.float32), np.array([3, 917], np.int32),
          rng.standard_normal((2, text_len, text_dim)).astype(np.float32))


def _torch_eps(ref, x, t, ctx, mask=None):
  with torch.no_grad():
    out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t.astype(np.int64)),
              torch.from_numpy(ctx), encoder_attention_mask=None if mask is None else torch.from_numpy(mask)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _jax_eps(model, x, t, ctx, mask=None):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, *a, **kw: nnx.merge(graphdef, s)(*a, **kw))
  masked = {} if mask is None else {"encoder_attention_mask": jnp.asarray(mask)}
  return np.asarray(fn(state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), **masked))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loaded_unet_matches_diffusers(tmp_path, name):
  kwargs, size, text_len = CONFIGS[name]
  ref, folder = _saved_diffusers_unet(tmp_path, kwargs)
  model = pretrained.load(folder)
  assert isinstance(model, UNet2DConditionModel)
  x, t, ctx = _inputs(ref.config.in_channels, size, text_len, ref.config.cross_attention_dim)
  # One config masks text tokens out of cross-attention (diffusers' `encoder_attention_mask`, ours alike).
  mask = np.arange(text_len) < np.array([[3], [text_len]]) if name == "sd2_headdims_linear" else None
  expected = _torch_eps(ref, x, t, ctx, mask)
  err = max_rel_err(_jax_eps(model, x, t, ctx, mask), expected)
  print(f"{name}: max rel err {err:.2e}")
  assert err <= TOL
  if mask is not None:  # the mask changes the reference's output, so agreeing with it means we honour it
    assert max_rel_err(_torch_eps(ref, x, t, ctx), expected) > 100 * TOL


def _random_unet(cfg, seed=0):
  """Our U-Net with random weights of a sensible scale; filled from numpy, as eager NNX init is slow on CPU."""
  model = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  arrays = {}
  for path, var in nnx.state(model, nnx.Param).flat_state():
    shape, leaf = var.value.shape, path[-1]
    if leaf == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    else:
      value = (leaf == "scale") + 0.1 * rng.standard_normal(shape)
    arrays[".".join(map(str, path))] = value.astype(np.float32)
  assign(model, arrays)
  nnx.update(model, jax.tree.map(jnp.asarray, nnx.state(model)))
  return model


def test_exported_unet_loads_in_diffusers_and_matches(tmp_path):
  cfg = UNetConfig(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=(2, 1),
                   attention_levels=(False, True), num_attention_heads=(2, 4), cross_attention_dim=12,
                   transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=4,
                   resnet_time_scale_shift="scale_shift")
  model = _random_unet(cfg)
  folder = str(tmp_path / "exported")
  punet.save_diffusers_unet(model, folder)

  ref = diffusers.UNet2DConditionModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
  x, t, ctx = _inputs(3, 8, 5, 12)
  err = max_rel_err(_jax_eps(model, x, t, ctx), _torch_eps(ref, x, t, ctx))
  print(f"exported: max rel err {err:.2e}")
  assert err <= TOL
  reloaded = pretrained.load(folder)
  assert reloaded.config == cfg
  ours, back = model_arrays(model), model_arrays(reloaded)
  assert ours.keys() == back.keys()
  for k, v in ours.items():
    np.testing.assert_array_equal(back[k], v)


def test_export_refuses_what_diffusers_cannot_express():
  cfg = UNetConfig(in_channels=1, out_channels=1, block_out_channels=(8,), attention_levels=(False,),
                   norm_num_groups=4, num_class_embeds=10)
  with pytest.raises(WeightsError, match="num_class_embeds"):
    punet.diffusers_config(cfg)


# The unet/config.json files of the public Stable Diffusion 1.5 and 2.1 checkpoints (as written by old diffusers
# versions: fields added later are absent and take their defaults).
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": [CA_DOWN, CA_DOWN, CA_DOWN, DOWN], "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64, "up_block_types": [UP, CA_UP, CA_UP, CA_UP]}
SD21_CONFIG = {
    **SD15_CONFIG, "_diffusers_version": "0.8.0", "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
    "dual_cross_attention": False, "num_class_embeds": None, "only_cross_attention": False, "sample_size": 96,
    "upcast_attention": True, "use_linear_projection": True}


@pytest.mark.parametrize("config,name", [(SD15_CONFIG, "sd15"), (SD21_CONFIG, "sd2")])
def test_stable_diffusion_configs_are_the_named_variants(config, name):
  assert punet.config_from_diffusers(config) == variant(name)
  assert punet.config_from_diffusers({**config, "in_channels": 9}).in_channels == 9  # inpainting
  config_again = punet.diffusers_config(variant(name))
  assert punet.config_from_diffusers(config_again) == variant(name)


def test_stable_diffusion_15_maps_shape_for_shape():
  """Every SD 1.5 weight lands on a parameter of the same shape; SD 2.x differs only in sizes the parity tests
  cover (linear projections, per-level heads)."""
  cfg = variant("sd15")
  init_args = {k: v for k, v in SD15_CONFIG.items() if not k.startswith("_")}
  with torch.device("meta"):  # shapes only: no 3.4 GB of weights
    ref = diffusers.UNet2DConditionModel(**init_args)
  zeros = {k: np.broadcast_to(np.zeros((), np.float32), v.shape) for k, v in ref.state_dict().items()}
  theirs = {k: v.shape for k, v in punet.from_diffusers_state(zeros).items()}
  model = abstract_model(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))  # shapes, without tracing init
  ours = {".".join(map(str, path)): v.shape for path, v in nnx.state(model, nnx.Param).flat_state()}
  assert theirs == ours
  assert sum(int(np.prod(s)) for s in ours.values()) == 859_520_964


# ---------------------------------------------------------------------------------------------- errors
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, down_block_types=(CA_DOWN, DOWN),
            up_block_types=(UP, CA_UP), attention_head_dim=2, cross_attention_dim=8, norm_num_groups=4)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  _, folder = _saved_diffusers_unet(tmp_path_factory.mktemp("tiny"), TINY)
  return folder


def _tampered(folder, tmp_path, edit):
  out = tmp_path / "tampered"
  out.mkdir()
  (out / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  state = read_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  edit(state)
  save_safetensors(state, str(out / "diffusion_pytorch_model.safetensors"))
  return str(out)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("mid_block.attentions.0.proj_out.bias"),
     r"missing 1 weights .*mid_block\.attentions\.0\.proj_out"),
    (lambda s: s.update({"conv_out.weight": s["conv_out.weight"][:, :4]}), r"conv_out\.kernel has shape"),
    (lambda s: s.update({"mid_block.resnets.2.conv1.bias": np.zeros(16, np.float32)}), r"does not use"),
])
def test_weight_mismatch_is_one_line_error(tiny_folder, tmp_path, edit, message):
  with pytest.raises(WeightsError, match=message) as info:
    pretrained.load(_tampered(tiny_folder, tmp_path, edit))
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("field,value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"), ("num_class_embeds", 10),
    ("center_input_sample", True), ("only_cross_attention", True), ("act_fn", "gelu"),
    ("down_block_types", [CA_DOWN, "SimpleCrossAttnDownBlock2D"]), ("mid_block_type", "UNetMidBlock2D"),
    ("transformer_layers_per_block", [[1, 2], [1, 2]]), ("cross_attention_dim", [8, 12]),
    ("time_embedding_type", "fourier"), ("some_future_field", 3),
])
def test_unsupported_config_field_is_named(tiny_folder, tmp_path, field, value):
  config = json.load(open(os.path.join(tiny_folder, "config.json")))
  config[field] = value
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(WeightsError, match=f"unsupported {field}=") as info:
    pretrained.load(str(tmp_path))
  assert "\n" not in str(info.value)
