"""AutoencoderKL: numeric parity with diffusers on randomly initialised small models, posterior maths, loading."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax import pretrained
from diffusion_jax.models.vae import AutoencoderKL, DiagonalGaussian, vae_config
from diffusion_jax.pretrained.vae import save_diffusers_vae
from diffusion_jax.pretrained.weights import WeightsError, read_folder, save_safetensors

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Small diffusers configs that between them vary every structural option the loader reads.
PARITY_CASES = {
    "2lvl_attn_32px": (dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8),
                       (32, 32)),
    "3lvl_noattn_64px": (dict(block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=3,
                              norm_num_groups=4, mid_block_add_attention=False), (64, 64)),
    "noquant_shift_rect": (dict(in_channels=1, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                                latent_channels=16, norm_num_groups=2, use_quant_conv=False,
                                use_post_quant_conv=False, shift_factor=0.1, scaling_factor=0.5), (64, 32)),
}


def _diffusers_vae(folder, seed=0, **kwargs):
  levels = len(kwargs["block_out_channels"])
  torch.manual_seed(seed)
  ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                up_block_types=("UpDecoderBlock2D",) * levels, **kwargs).eval()
  with torch.no_grad():  # norms start at scale 1, bias 0; perturb them so a swapped or dropped affine shows
    for name, p in ref.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  ref.save_pretrained(folder)
  return ref


def _encode_decode(model, images, latents):
  """(posterior, decode(latents)) in one compiled call: faster than op-by-op dispatch even for tiny models."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, images, latents):
    m = nnx.merge(graphdef, state)
    return m.encode(images), m.decode(latents)

  return run(state, jnp.asarray(images), jnp.asarray(latents))


def _rel(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def reference_folders(tmp_path_factory):
  out = {}
  for name, (kwargs, size) in PARITY_CASES.items():
    folder = str(tmp_path_factory.mktemp(name))
    out[name] = (_diffusers_vae(folder, **kwargs), folder, kwargs, size)
  return out


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_matches_diffusers(reference_folders, case):
  ref, folder, kwargs, (h, w) = reference_folders[case]
  ours = pretrained.load(folder)
  assert isinstance(ours, AutoencoderKL)
  assert ours.config.shift_factor == kwargs.get("shift_factor")
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, h, w, kwargs.get("in_channels", 3))).astype(np.float32)
  factor = ours.config.downsample_factor
  latents = rng.standard_normal((2, h // factor, w // factor, kwargs["latent_channels"])).astype(np.float32)
  with torch.no_grad():
    post = ref.encode(_nchw(images)).latent_dist
    decoded = ref.decode(_nchw(latents)).sample
  posterior, ours_decoded = _encode_decode(ours, images, latents)
  errs = {"mean": _rel(posterior.mean, _nhwc(post.mean)), "logvar": _rel(posterior.logvar, _nhwc(post.logvar)),
          "decode": _rel(ours_decoded, _nhwc(decoded))}
  print(case, errs)
  assert max(errs.values()) <= 1e-4, errs


def test_call_decodes_the_mode_or_a_sample(reference_folders):
  model = pretrained.load(reference_folders["2lvl_attn_32px"][1])  # loading skips the slow eager random init
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, x, rng):
    m = nnx.merge(graphdef, state)
    recon, posterior = m(x)
    sampled, _ = m(x, rng, sample_posterior=True)
    return recon, sampled, posterior, m.decode(posterior.mean), m.decode(posterior.sample(rng))

  x = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), minval=-1, maxval=1)
  recon, sampled, posterior, recon_ref, sampled_ref = run(state, x, jax.random.key(2))
  assert recon.shape == x.shape and posterior.mean.shape == (1, 8, 8, 4)
  np.testing.assert_allclose(recon, recon_ref, atol=1e-6)
  np.testing.assert_allclose(sampled, sampled_ref, atol=1e-6)
  assert float(jnp.max(jnp.abs(sampled - recon))) > 1e-4
  with pytest.raises(ValueError, match="rng"):
    model(x, sample_posterior=True)


def test_decode_with_features_gives_the_input_of_diffusers_conv_out(reference_folders):
  ref, folder, _, _ = reference_folders["2lvl_attn_32px"]
  model = pretrained.load(folder)
  graphdef, state = nnx.split(model)
  z = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
  image, features, decoded = jax.jit(lambda s, z: (*nnx.merge(graphdef, s).decode_with_features(z),
                                                   nnx.merge(graphdef, s).decode(z)))(state, z)
  seen = []
  hook = ref.decoder.conv_out.register_forward_hook(lambda module, args, out: seen.append(args[0]))
  with torch.no_grad():
    ref.decode(_nchw(z))
  hook.remove()
  np.testing.assert_array_equal(image, decoded)
  assert _rel(features, _nhwc(seen[0])) <= 1e-4


def test_posterior_kl_and_clipping_match_diffusers():
  from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
  rng = np.random.default_rng(0)
  moments = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)  # NHWC, 3 latent channels
  moments[0, 0, 0, 3] = 100.0  # clipped to logvar 20
  moments[1, 0, 0, 4] = -100.0  # clipped to logvar -30
  other_moments = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
  ours, other = DiagonalGaussian.from_moments(jnp.asarray(moments)), DiagonalGaussian.from_moments(other_moments)
  ref = DiagonalGaussianDistribution(_nchw(moments))
  ref_other = DiagonalGaussianDistribution(_nchw(other_moments))
  assert float(ours.logvar.max()) == 20.0 and float(ours.logvar.min()) == -30.0
  np.testing.assert_allclose(ours.logvar, _nhwc(ref.logvar))
  np.testing.assert_allclose(ours.std, _nhwc(ref.std), rtol=1e-6)
  np.testing.assert_allclose(ours.kl(), ref.kl().numpy(), rtol=1e-5)
  np.testing.assert_allclose(ours.kl(other), ref.kl(ref_other).numpy(), rtol=1e-5)
  assert ours.kl().shape == (3,)
  np.testing.assert_array_equal(ours.mode(), ours.mean)


def test_sample_is_mean_plus_std_times_standard_normal():
  # numpy moments: each eager jax.random shape costs a threefry compile.
  post = DiagonalGaussian.from_moments(np.random.default_rng(0).standard_normal((2, 4, 4, 8)).astype(np.float32))
  rng = jax.random.key(7)
  np.testing.assert_allclose(post.sample(rng), post.mean + post.std * jax.random.normal(rng, post.mean.shape),
                             rtol=1e-6)
  # The posterior is a pytree, so it can be returned from jit.
  out = jax.jit(lambda p: p)(post)
  assert isinstance(out, DiagonalGaussian)


def test_every_parameter_has_logical_axis_names():
  # Shapes suffice, and skip the random init; tiny3 has attention, quant convs, down- and upsamplers.
  model = nnx.eval_shape(lambda: AutoencoderKL(vae_config("tiny3"), rngs=nnx.Rngs(0)))
  names = set()
  for path, var in nnx.state(model, nnx.Param).flat_state():
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.shape), f"{path} has no logical axes of the right rank"
    names.update(a for a in axes if a is not None)
  assert names == {"conv_in", "conv_out", "norm", "embed", "heads"}


def test_variants():
  sd = vae_config("sd")
  assert (sd.block_out_channels, sd.layers_per_block, sd.latent_channels, sd.norm_num_groups, sd.scaling_factor
          ) == ((128, 256, 512, 512), 2, 4, 32, 0.18215)
  assert sd.downsample_factor == 8 and vae_config("tiny", latent_channels=8).latent_channels == 8
  with pytest.raises(ValueError, match="unknown VAE variant"):
    vae_config("sd9")
  model = nnx.eval_shape(lambda: AutoencoderKL(vae_config("tiny", shift_factor=0.5, scaling_factor=2.0),
                                               rngs=nnx.Rngs(0)))
  z = jnp.arange(4.0)
  np.testing.assert_allclose(model.scale_latents(z), (z - 0.5) * 2.0)
  np.testing.assert_allclose(model.unscale_latents(model.scale_latents(z)), z)


@pytest.fixture()
def small_folder(reference_folders):
  return reference_folders["2lvl_attn_32px"][1]


def _copy_with_state(src, dst, edit_state=None, edit_config=None):
  state = read_folder(src)
  if edit_state:
    state = edit_state(dict(state))
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  if edit_config:
    edit_config(config)
  os.makedirs(dst, exist_ok=True)
  save_safetensors(state, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  return dst


def _first(state, suffix):
  return next(k for k in sorted(state) if k.endswith(suffix))


def test_loads_old_style_attention_names(small_folder, tmp_path):
  def rename(state):
    for key in [k for k in state if ".attentions." in k]:
      new = key
      for a, b in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")):
        new = new.replace(a, b)
      value = state.pop(key)
      if new.endswith("weight") and value.ndim == 2 and "norm" not in new:
        value = value[:, :, None, None]  # original LDM checkpoints store the projections as 1×1 convs
      state[new] = value
    return state
  folder = _copy_with_state(small_folder, str(tmp_path / "old"), rename)
  assert any(".proj_attn." in k for k in read_folder(folder))
  new, old = pretrained.load(small_folder), pretrained.load(folder)
  x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  z = np.ones((1, 8, 8, 4), np.float32)
  for a, b in zip(jax.tree.leaves(_encode_decode(old, x, z)), jax.tree.leaves(_encode_decode(new, x, z))):
    np.testing.assert_array_equal(a, b)


def _without(state, suffix):
  del state[_first(state, suffix)]
  return state


@pytest.mark.parametrize("edit,match", [
    (lambda s: _without(s, "mid_block.attentions.0.to_q.weight"), r"missing 1 weights.*to_q\.weight"),
    (lambda s: {**s, "encoder.extra.weight": np.zeros(3, np.float32)}, r"does not use.*encoder\.extra\.weight"),
    (lambda s: {**s, "decoder.conv_in.bias": np.zeros(7, np.float32)}, r"decoder\.conv_in\.bias has shape \(7,\)"),
])
def test_strict_loading(small_folder, tmp_path, edit, match):
  folder = _copy_with_state(small_folder, str(tmp_path / "bad"), edit)
  with pytest.raises(WeightsError, match=match):
    pretrained.load(folder)


def test_unsupported_block_type_is_one_line_error(small_folder, tmp_path):
  def edit(config):
    config["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
  folder = _copy_with_state(small_folder, str(tmp_path / "attn"), edit_config=edit)
  with pytest.raises(WeightsError, match="down_block_types") as e:
    pretrained.load(folder)
  assert "\n" not in str(e.value)


def test_export_round_trips_through_diffusers(small_folder, tmp_path):
  ours = pretrained.load(small_folder, attention_impl="xla")
  assert ours.config.attention_impl == "xla"
  save_diffusers_vae(ours, str(tmp_path / "export"))
  ref = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "export")).eval()
  x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  posterior, decoded = _encode_decode(ours, x, np.zeros((1, 16, 16, 4), np.float32))
  with torch.no_grad():
    ref_post = ref.encode(_nchw(x)).latent_dist
    ref_decoded = ref.decode(torch.zeros(1, 4, 16, 16)).sample
  assert _rel(posterior.mean, _nhwc(ref_post.mean)) <= 1e-4
  assert _rel(decoded, _nhwc(ref_decoded)) <= 1e-4
  with pytest.raises(TypeError, match="unknown AutoencoderKL load options"):
    pretrained.load(small_folder, num_heads=2)


# ---------------------------------------------------------------------------------------------------- VQModel
VQ_CASES = {
    "2lvl_attn": (dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                       num_vq_embeddings=64), (32, 32)),
    "3lvl_embed_dim_rect": (dict(in_channels=1, out_channels=2, block_out_channels=(8, 16, 16), layers_per_block=2,
                                 latent_channels=3, vq_embed_dim=6, num_vq_embeddings=37, norm_num_groups=4,
                                 mid_block_add_attention=False), (32, 64)),
    # Kandinsky's MoVQ: SpatialNorm (32 groups, so 32-channel levels) in every decoder norm, attention included
    "movq_spatial": (dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, vq_embed_dim=4,
                          num_vq_embeddings=48, norm_num_groups=8, norm_type="spatial"), (32, 32)),
}


@pytest.mark.parametrize("case", sorted(VQ_CASES))
def test_vq_model_matches_diffusers(tmp_path, case):
  """encode (continuous latents), quantize (entries and identical code indices) and decode against diffusers'
  VQModel saved by its own save_pretrained."""
  from diffusion_jax.models.vq import VQModel
  kwargs, (h, w) = VQ_CASES[case]
  levels = len(kwargs["block_out_channels"])
  torch.manual_seed(0)
  ref = diffusers.VQModel(down_block_types=("DownEncoderBlock2D",) * levels,
                          up_block_types=("UpDecoderBlock2D",) * levels, **kwargs).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
    # The default codebook (±1/K) is far narrower than random latents, which would all fall on a few corner codes;
    # spread it like the latents so that many codes are used and near ties are a real test of the distances.
    x = torch.rand(2, kwargs.get("in_channels", 3), h, w) * 2 - 1
    latents = ref.encode(x).latents
    ref.quantize.embedding.weight.copy_(latents.std() * torch.randn_like(ref.quantize.embedding.weight))
    quantized, _, (_, _, ref_indices) = ref.quantize(latents)
    decoded = ref.decode(latents).sample
  folder = str(tmp_path / "vq")
  ref.save_pretrained(folder)
  vq = pretrained.load(folder)
  assert isinstance(vq, VQModel)
  images = jnp.asarray(_nhwc(x))
  ours_latents = vq.encode(images)
  assert _rel(ours_latents, _nhwc(latents)) < 1e-4
  ours_quantized, indices = vq.quantize(jnp.asarray(_nhwc(latents)))
  assert indices.dtype == jnp.int32 and indices.shape == (2, h // 2 ** (levels - 1), w // 2 ** (levels - 1))
  np.testing.assert_array_equal(np.asarray(indices).reshape(-1), ref_indices.numpy().reshape(-1))
  assert len(np.unique(np.asarray(indices))) > 8  # many codes in play, not one or two
  assert _rel(ours_quantized, _nhwc(quantized)) < 1e-6
  assert _rel(vq.decode(jnp.asarray(_nhwc(latents))), _nhwc(decoded)) < 1e-4
  np.testing.assert_allclose(vq.decode_indices(indices), vq.decode(jnp.asarray(_nhwc(latents))), atol=1e-6)
  # And back: our export is read by diffusers to the same decoder.
  save_diffusers_vae(vq, str(tmp_path / "export"))
  again = diffusers.VQModel.from_pretrained(str(tmp_path / "export")).eval()
  with torch.no_grad():
    assert _rel(_nhwc(again.decode(latents).sample), _nhwc(decoded)) < 1e-6


def test_vq_straight_through_losses_and_one_line_errors(tmp_path):
  from diffusion_jax.models.vq import VectorQuantizer, VQConfig, VQModel
  q = VectorQuantizer(5, 2, rngs=nnx.Rngs(0))
  q.embedding.embedding.set_value(jnp.asarray([[0., 0.], [1., 0.], [0., 1.], [-1., 0.], [5., 5.]]))
  z = jnp.asarray([[0.9, 0.2], [-0.1, 0.05], [0.1, 1.4]])
  out, indices, codebook_loss, commitment = q.straight_through(z)
  np.testing.assert_array_equal(indices, [1, 0, 2])
  np.testing.assert_allclose(out, [[1., 0.], [0., 0.], [0., 1.]], atol=1e-7)
  want = np.mean(np.square(np.asarray(z) - np.asarray(out)))
  np.testing.assert_allclose([codebook_loss, commitment], [want, want], rtol=1e-6)
  # The straight-through estimator: d out / d z is the identity; the codebook loss moves only the codes.
  grad = jax.grad(lambda z: q.straight_through(z)[0].sum())(z)
  np.testing.assert_array_equal(grad, np.ones_like(z))
  with pytest.raises(ValueError, match="double_z must be False"):
    VQModel(VQConfig(double_z=True), rngs=nnx.Rngs(0))
  folder = tmp_path / "spatial"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"_class_name": "VQModel", "norm_type": "spatial",
                                                  "latent_channels": 4, "vq_embed_dim": 3}))
  with pytest.raises(WeightsError, match="takes codes as wide as latent_channels=4, but vq_embed_dim=3"):
    pretrained.load(str(folder))
  (folder / "config.json").write_text(json.dumps({"_class_name": "VQModel", "norm_type": "layer"}))
  with pytest.raises(WeightsError, match="norm_type 'layer' is not supported"):
    pretrained.load(str(folder))
