"""diffusers' UnCLIPPipeline and UnCLIPImageVariationPipeline (Karlo's layout) loaded with `pretrained.load_pipeline`,
against diffusers on tiny random folders saved with `save_pretrained`.

diffusers draws fresh torch noise in every scheduler step; the test records those draws and hands them to our
pipeline as `step_noise`, with the same initial latents, so both run the same chain. Criterion as for Stable
Diffusion (tests/test_sd_pipeline.py): float images within 2e-3 and the uint8 images within 1/255 mean absolute
difference. Each component's own parity is tested in tests/test_unclip_parts.py and tests/test_unclip_unet_parity.py.
"""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # noqa: E402
from diffusers.schedulers import scheduling_unclip  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_jax import pretrained  # noqa: E402
from diffusion_jax.pipelines.unclip import UnCLIPPipeline, upsample_bicubic  # noqa: E402
from diffusion_jax.pretrained.weights import WeightsError  # noqa: E402
from diffusion_jax.tokenizer import write_vocab_and_merges  # noqa: E402
from tests.torch_parity import one_torch_thread, perturbed  # noqa: E402,F401 (autouse fixture)

EMBED, CROSS, SMALL, LARGE, TEXT_LEN = 32, 24, 16, 32, 20
STEPS = dict(prior_num_inference_steps=4, decoder_num_inference_steps=4, super_res_num_inference_steps=3)
FLOAT_TOL = 2e-3


def _parts(root):
  torch.manual_seed(0)
  text_encoder = perturbed(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      hidden_size=EMBED, projection_dim=EMBED, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
      vocab_size=49408, max_position_embeddings=32)), 1)
  tokenizer = transformers.CLIPTokenizer(*write_vocab_and_merges(str(root / "tokenizer_files")),
                                         model_max_length=TEXT_LEN)
  text_proj = perturbed(UnCLIPTextProjModel(clip_embeddings_dim=EMBED, time_embed_dim=64,
                                                       cross_attention_dim=CROSS), 2)
  decoder = perturbed(diffusers.UNet2DConditionModel(
      sample_size=SMALL, in_channels=3, out_channels=6, down_block_types=("ResnetDownsampleBlock2D",
                                                                          "SimpleCrossAttnDownBlock2D"),
      up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
      mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(16, 32), layers_per_block=1,
      cross_attention_dim=CROSS, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
      class_embed_type="identity", norm_num_groups=8), 3)
  super_res = dict(sample_size=LARGE, layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D",) * 2,
                   up_block_types=("ResnetUpsampleBlock2D",) * 2, block_out_channels=(16, 32), in_channels=6,
                   out_channels=3, norm_num_groups=8)
  return dict(
      text_encoder=text_encoder, tokenizer=tokenizer, text_proj=text_proj, decoder=decoder,
      super_res_first=perturbed(diffusers.UNet2DModel(**super_res), 4),
      super_res_last=perturbed(diffusers.UNet2DModel(**super_res), 5),
      decoder_scheduler=diffusers.UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
      super_res_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """{'text': (folder, diffusers UnCLIPPipeline), 'variation': (folder, UnCLIPImageVariationPipeline)}."""
  root = tmp_path_factory.mktemp("unclip")
  parts = _parts(root)
  prior = perturbed(diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED,
                                                num_layers=1, num_embeddings=TEXT_LEN), 6)
  text = diffusers.UnCLIPPipeline(prior=prior, prior_scheduler=diffusers.UnCLIPScheduler(
      variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0), **parts)
  image_encoder = perturbed(transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=EMBED, projection_dim=EMBED, num_hidden_layers=2, num_attention_heads=4, image_size=32,
      intermediate_size=37, patch_size=8)), 7)
  feature_extractor = transformers.CLIPImageProcessor(crop_size=32, size=32)
  variation = diffusers.UnCLIPImageVariationPipeline(image_encoder=image_encoder,
                                                     feature_extractor=feature_extractor, **parts)
  out = {}
  for name, pipe in (("text", text), ("variation", variation)):
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(root / name))
    out[name] = (str(root / name), pipe)
  return out


class _RecordedNoise:
  """Records the noise diffusers' UnCLIPScheduler draws in its steps (in order)."""

  def __init__(self, monkeypatch):
    self.draws = []
    original = scheduling_unclip.randn_tensor

    def record(*args, **kwargs):
      x = original(*args, **kwargs)
      self.draws.append(x.numpy().copy())
      return x

    monkeypatch.setattr(scheduling_unclip, "randn_tensor", record)

  def step_noise(self, counts: dict[str, int]) -> dict[str, np.ndarray]:
    """{stage: [steps, ...]} in our layout (NHWC); each stage's last step draws nothing (a zero row)."""
    out, i = {}, 0
    for stage, steps in counts.items():
      rows = self.draws[i:i + steps - 1]
      i += steps - 1
      rows = [r.transpose(0, 2, 3, 1) if r.ndim == 4 else r for r in rows]
      out[stage] = np.stack(rows + [np.zeros_like(rows[0])])
    assert i == len(self.draws)
    return out


def _latents(batch, with_prior=True, seed=0):
  rng = np.random.default_rng(seed)
  out = {"decoder_latents": rng.standard_normal((batch, SMALL, SMALL, 3)).astype(np.float32),
         "super_res_latents": rng.standard_normal((batch, LARGE, LARGE, 3)).astype(np.float32)}
  if with_prior:
    out["prior_latents"] = rng.standard_normal((batch, EMBED)).astype(np.float32)
  return out


def _torch(latents):
  return {k: torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2) if v.ndim == 4 else v))
          for k, v in latents.items()}


def _compare(ours, ref):
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  assert ref.std() > 0.02  # not a blank image that would match anything
  max_float = float(np.abs(ours - ref).max())
  mean_u8 = float(np.abs((ours * 255).round() - (ref * 255).round()).mean())
  print(f"float max abs diff {max_float:.2e}; uint8 mean abs diff {mean_u8:.4f}/255")
  assert max_float <= FLOAT_TOL
  assert mean_u8 <= 1.0


def test_text_to_image_matches_diffusers(reference, monkeypatch):
  folder, ref = reference["text"]
  pipe = pretrained.load_pipeline(folder)
  assert isinstance(pipe, UnCLIPPipeline) and not pipe.is_variation
  prompts = ["a photo of a cat", "a red square on a blue background"]
  latents = _latents(len(prompts))
  noise = _RecordedNoise(monkeypatch)
  expected = ref(prompts, output_type="np", **STEPS, **_torch(latents)).images
  step_noise = noise.step_noise({"prior": 4, "decoder": 4, "super_res": 3})
  got = pipe(prompts, output_type="float", step_noise=step_noise, **STEPS, **latents)
  _compare(got, expected)
  # uint8 by default; a repeated call with other latents and scales reuses the compiled program.
  traced = pipe.trace_count
  images = pipe(prompts, **STEPS, seed=1, decoder_guidance_scale=5.0)
  assert images.dtype == np.uint8 and images.shape == (2, LARGE, LARGE, 3)
  pipe(prompts, **STEPS, seed=2, prior_guidance_scale=2.0)
  assert pipe.trace_count == traced + 1


def test_unguided_chain_matches_diffusers(reference, monkeypatch):
  folder, ref = reference["text"]
  pipe = pretrained.load_pipeline(folder)
  latents = _latents(1, seed=3)
  noise = _RecordedNoise(monkeypatch)
  scales = dict(prior_guidance_scale=1.0, decoder_guidance_scale=1.0)
  expected = ref(["a dog"], output_type="np", **STEPS, **scales, **_torch(latents)).images
  got = pipe(["a dog"], output_type="float", step_noise=noise.step_noise({"prior": 4, "decoder": 4, "super_res": 3}),
             **STEPS, **scales, **latents)
  _compare(got, expected)


def test_image_variations_match_diffusers(reference, monkeypatch):
  folder, ref = reference["variation"]
  pipe = pretrained.load_pipeline(folder)
  assert pipe.is_variation
  rng = np.random.default_rng(5)
  images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), np.uint8)) for _ in range(2)]
  latents = _latents(2, with_prior=False)
  steps = {k: v for k, v in STEPS.items() if not k.startswith("prior")}
  noise = _RecordedNoise(monkeypatch)
  expected = ref(images, output_type="np", **steps, **_torch(latents)).images
  got = pipe(images, output_type="float", step_noise=noise.step_noise({"decoder": 4, "super_res": 3}), **steps,
             **latents)
  _compare(got, expected)


def test_bicubic_upsampling_is_torchs_antialiased_one():
  x = np.random.default_rng(0).standard_normal((2, 3, 7, 5)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(16, 12), mode="bicubic", align_corners=False,
                                        antialias=True).numpy()
  got = np.asarray(upsample_bicubic(x.transpose(0, 2, 3, 1), (16, 12))).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, ref, atol=2e-5)


def test_folder_and_input_errors(reference, tmp_path):
  folder, _ = reference["text"]
  broken = str(tmp_path / "broken")
  shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("prior"))
  with pytest.raises(WeightsError, match="missing component 'prior'"):
    pretrained.load_pipeline(broken)
  index = json.load(open(os.path.join(folder, "model_index.json")))
  del index["text_proj"]
  json.dump(index, open(os.path.join(broken, "model_index.json"), "w"))
  with pytest.raises(WeightsError, match="has no 'text_proj' component; a UnCLIPPipeline folder needs"):
    pretrained.load_pipeline(broken)
  with pytest.raises(ValueError, match="samples with its UnCLIPSchedulers"):
    pretrained.load_pipeline(folder, sampler="ddim")
  pipe = pretrained.load_pipeline(folder)
  with pytest.raises(ValueError, match="prior_latents has shape"):
    pipe(["a cat"], prior_latents=np.zeros((3, EMBED), np.float32), **STEPS)
