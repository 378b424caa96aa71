"""Numeric parity with diffusers' unCLIP (Karlo) U-Nets on small random models, through the public loader.

The decoder is a `UNet2DConditionModel` of ResnetDownsample / SimpleCrossAttn blocks (added-key/value attention
with a text mask), scale-shift resnets and an additive class embedding; the super-resolution models are
`UNet2DModel`s. As in test_unet_parity.py every parameter is perturbed, the model saved with `save_pretrained`,
loaded with `pretrained.load`, and run on the same inputs: max|ours - ref| / max|ref| <= 1e-4 in float32. Each
loaded model is also written back with `save_diffusers_unet` and must read into diffusers with the same config
and weights. The full-size Karlo decoder is checked shape-for-shape without allocating weights.
"""
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
from diffusion_jax.models.unet import UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusion_jax.pretrained import unet as punet  # noqa: E402
from diffusion_jax.pretrained.weights import WeightsError, read_file, save_safetensors  # noqa: E402
from tests.torch_parity import max_rel_err, one_torch_thread, perturbed  # noqa: E402,F401 (autouse fixture)

TOL = 1e-4
RES_DOWN, SIMPLE_DOWN, ATTN_DOWN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "AttnDownBlock2D"
RES_UP, SIMPLE_UP, ATTN_UP = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D", "AttnUpBlock2D"
SIMPLE_MID = "UNetMidBlock2DSimpleCrossAttn"

# diffusers' own unCLIP test decoder (tests/pipelines/unclip), at smaller widths and with group norms that fit them.
DECODER = dict(in_channels=3, out_channels=6, down_block_types=(RES_DOWN, SIMPLE_DOWN),
               up_block_types=(SIMPLE_UP, RES_UP), mid_block_type=SIMPLE_MID, block_out_channels=(16, 32),
               layers_per_block=1, cross_attention_dim=12, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
               class_embed_type="identity", norm_num_groups=8)
DECODERS = {
    "karlo_masked": DECODER,
    # Pixels attend to the text alone; other head widths, per-level layer counts. (No mask: diffusers pads the mask
    # for the pixels' own keys, which this variant does not have, and fails.)
    "only_cross_attention": {**DECODER, "only_cross_attention": True, "attention_head_dim": 8,
                             "layers_per_block": (1, 2), "norm_eps": 1e-6},
}
SUPER_RES = {
    # Karlo's super_res_first/last: noisy image + upsampled low-res image in, resnet resampling, no attention.
    "karlo_no_attention": dict(in_channels=6, out_channels=3, down_block_types=(RES_DOWN, RES_DOWN),
                               up_block_types=(RES_UP, RES_UP), block_out_channels=(16, 32), layers_per_block=1,
                               resnet_time_scale_shift="scale_shift", add_attention=False, norm_num_groups=8),
    # Attention blocks resampling by resnets, and a middle attention that scale_shift leaves without group norm.
    "attention_resnet_resample": dict(in_channels=6, out_channels=3, down_block_types=(RES_DOWN, ATTN_DOWN),
                                      up_block_types=(ATTN_UP, RES_UP), block_out_channels=(16, 32),
                                      layers_per_block=1, downsample_type="resnet", upsample_type="resnet",
                                      attention_head_dim=8, resnet_time_scale_shift="scale_shift", norm_num_groups=8),
    # DDPM-style: conv resampling, default time shift (the middle attention has its group norm).
    "ddpm_conv": dict(in_channels=3, out_channels=3, down_block_types=("DownBlock2D", ATTN_DOWN),
                      up_block_types=(ATTN_UP, "UpBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
                      attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6),
}


def _saved(tmp_path, cls, kwargs, seed=0):
  torch.manual_seed(seed)
  ref = perturbed(cls(**kwargs), seed)
  folder = str(tmp_path / "ref")
  ref.save_pretrained(folder)
  return ref, folder


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _ours(model, *args, **kwargs):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, *a, **kw: nnx.merge(graphdef, s)(*a, **kw))
  return np.asarray(fn(state, *map(jnp.asarray, args), **{k: jnp.asarray(v) for k, v in kwargs.items()}))


def _assert_exports_back(model, ref, run, expected, tmp_path):
  """`save_diffusers_unet` writes a folder diffusers reads into the same model: same weights, and the same outputs
  (`run(torch_model)`, `expected` from `ref`), which config fields such as the time shift or the class embedding
  change."""
  folder = str(tmp_path / "exported")
  punet.save_diffusers_unet(model, folder)
  back = type(ref).from_pretrained(folder, low_cpu_mem_usage=False).eval()
  theirs, ours = ref.state_dict(), back.state_dict()
  assert theirs.keys() == ours.keys()
  for key in theirs:
    torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
  np.testing.assert_array_equal(run(back), expected)


@pytest.mark.parametrize("name", list(DECODERS))
def test_karlo_decoder_matches_diffusers(tmp_path, name):
  kwargs = DECODERS[name]
  ref, folder = _saved(tmp_path, diffusers.UNet2DConditionModel, kwargs)
  model = pretrained.load(folder)
  assert type(model) is UNet2DConditionModel
  assert model.config.attention_block == "added_kv" and model.config.resample == "resnet"
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  t = np.array([3, 917], np.int32)
  ctx = rng.standard_normal((2, 5, 12)).astype(np.float32)
  # unCLIP's additive embedding of the CLIP image embedding, [B, time_embed_dim].
  added = rng.standard_normal((2, 4 * 16)).astype(np.float32)
  mask = np.array([[True, True, True, False, False], [True] * 5]) if name == "karlo_masked" else None

  def run(unet, mask=mask):
    with torch.no_grad():
      return unet(_nchw(x), torch.from_numpy(t.astype(np.int64)), torch.from_numpy(ctx),
                  class_labels=torch.from_numpy(added),
                  attention_mask=None if mask is None else torch.from_numpy(mask)).sample.numpy().transpose(0, 2, 3, 1)

  expected = run(ref)
  masked = {} if mask is None else {"encoder_attention_mask": mask}
  err = max_rel_err(_ours(model, x, t, ctx, class_labels=added, **masked), expected)
  print(f"{name}: max rel err {err:.2e}")
  assert err <= TOL
  if mask is not None:  # the mask changes the reference's output, so agreeing with it means we honour it
    assert max_rel_err(run(ref, None), expected) > 100 * TOL
  _assert_exports_back(model, ref, run, expected, tmp_path)


@pytest.mark.parametrize("name", list(SUPER_RES))
def test_super_res_unet2d_matches_diffusers(tmp_path, name):
  kwargs = SUPER_RES[name]
  ref, folder = _saved(tmp_path, diffusers.UNet2DModel, kwargs)
  model = pretrained.load(folder)
  assert type(model) is UNet2DModel
  x = np.random.default_rng(0).standard_normal((2, 8, 8, kwargs["in_channels"])).astype(np.float32)
  t = np.array([5, 600], np.int32)

  def run(unet):
    with torch.no_grad():
      return unet(_nchw(x), torch.from_numpy(t.astype(np.int64))).sample.numpy().transpose(0, 2, 3, 1)

  expected = run(ref)
  err = max_rel_err(_ours(model, x, t), expected)
  print(f"{name}: max rel err {err:.2e}")
  assert err <= TOL
  _assert_exports_back(model, ref, run, expected, tmp_path)
  if name == "attention_resnet_resample":
    # Folders saved before diffusers renamed its attention weights (DDPM's) load to the same parameters.
    old = tmp_path / "old_names"
    old.mkdir()
    state = read_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    for new_name, old_name in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                               (".to_out.0.", ".proj_attn.")):
      state = {k.replace(new_name, old_name): v for k, v in state.items()}
    save_safetensors(state, str(old / "diffusion_pytorch_model.safetensors"))
    (old / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    again = nnx.state(pretrained.load(str(old)), nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, again, nnx.state(model, nnx.Param))


# kakaobrain/karlo-v1-alpha decoder/config.json
KARLO_DECODER_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 64,
    "block_out_channels": [320, 640, 960, 1280], "center_input_sample": False, "class_embed_type": "identity",
    "cross_attention_dim": 1536, "down_block_types": [RES_DOWN, SIMPLE_DOWN, SIMPLE_DOWN, SIMPLE_DOWN],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 3, "layers_per_block": 3, "mid_block_scale_factor": 1, "mid_block_type": SIMPLE_MID,
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 6, "resnet_time_scale_shift": "scale_shift", "sample_size": 64,
    "up_block_types": [SIMPLE_UP, SIMPLE_UP, SIMPLE_UP, RES_UP], "upcast_attention": False,
    "use_linear_projection": False}


def test_karlo_decoder_maps_shape_for_shape():
  cfg = punet.config_from_diffusers(KARLO_DECODER_CONFIG)
  assert cfg.num_attention_heads == (5, 10, 15, 20)  # 64-wide heads
  with torch.device("meta"):  # shapes only
    ref = diffusers.UNet2DConditionModel(**{k: v for k, v in KARLO_DECODER_CONFIG.items() if k[0] != "_"})
  zeros = {k: np.broadcast_to(np.zeros((), np.float32), v.shape) for k, v in ref.state_dict().items()}
  theirs = {k: v.shape for k, v in punet.from_diffusers_state(zeros).items()}
  model = abstract_model(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
  ours = {".".join(map(str, path)): v.shape for path, v in nnx.state(model, nnx.Param).flat_state()}
  assert theirs == ours
  print(f"Karlo decoder: {sum(int(np.prod(s)) for s in ours.values()):,} parameters")
  assert punet.config_from_diffusers(punet.diffusers_config(cfg)) == cfg


@pytest.mark.parametrize("cls,edit,field", [
    ("cond", {"class_embed_type": "timestep"}, "class_embed_type"),
    ("cond", {"down_block_types": [SIMPLE_DOWN, "CrossAttnDownBlock2D"]}, "down_block_types"),
    ("cond", {"down_block_types": ["DownBlock2D", SIMPLE_DOWN]}, "up_block_types"),  # conv and resnet resampling
    ("cond", {"mid_block_type": "UNetMidBlock2DCrossAttn"}, "mid_block_type"),
    ("cond", {"down_block_types": [SIMPLE_DOWN] * 2, "up_block_types": [SIMPLE_UP] * 2,
              "only_cross_attention": [False, True]}, "only_cross_attention"),
    ("cond", {"mid_block_only_cross_attention": True}, "mid_block_only_cross_attention"),
    ("cond", {"only_cross_attention": [True, True]}, "mid_block_only_cross_attention"),  # a list skips the mid
    ("cond", {"attention_head_dim": 5}, "attention_head_dim"),
    ("cond", {"attention_head_dim": [4, 8]}, "attention_head_dim"),  # diffusers' up path reads these reversed
    ("cond", {"cross_attention_norm": "group_norm"}, "cross_attention_norm"),
    ("plain", {"down_block_types": ["SkipDownBlock2D", RES_DOWN]}, "down_block_types"),
    ("plain", {"attn_norm_num_groups": 4}, "attn_norm_num_groups"),
    ("plain", {"time_embedding_type": "fourier"}, "time_embedding_type"),
    ("plain", {"upsample_type": "fir"}, "upsample_type"),
])
def test_unsupported_config_field_is_named(cls, edit, field):
  parse, base = ((punet.config_from_diffusers, DECODER) if cls == "cond"
                 else (punet.unet2d_config_from_diffusers, SUPER_RES["karlo_no_attention"]))
  with pytest.raises(WeightsError, match=f"unsupported {field}=") as info:
    parse({**base, **edit})
  assert "\n" not in str(info.value)


def test_resnet_resampling_refuses_sizes_it_cannot_restore():
  cfg = punet.unet2d_config_from_diffusers(SUPER_RES["karlo_no_attention"])
  model = abstract_model(lambda: UNet2DModel(cfg, rngs=nnx.Rngs(0)))  # refused before any weight is used
  with pytest.raises(ValueError, match="divisible by 2"):
    model(jnp.zeros((1, 6, 7, 6)), jnp.zeros((1,)))
