"""Numeric parity with transformers' SigLIP on small random models, in float32, through `pretrained.load`.

As in test_clip_parity, every transformers parameter is perturbed before saving so that zero biases, unit norms or
the zero logit scale/bias of a fresh model cannot hide a wrong mapping. Criterion: max|ours - ref| / max|ref| <= 1e-4.
"""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diffusion_jax import pretrained  # noqa: E402
from diffusion_jax.models import clip as jclip  # noqa: E402
from diffusion_jax.models import vit  # noqa: E402
from diffusion_jax.pretrained import siglip  # noqa: E402
from diffusion_jax.pretrained.clip import save_transformers as save_clip  # noqa: E402
from diffusion_jax.pretrained.weights import WeightsError  # noqa: E402
from flax import nnx  # noqa: E402
from tests.test_clip_models import random_model  # noqa: E402
from tests.test_clip_parity import _check, _nhwc, _perturbed, _run, max_rel_err  # noqa: E402

TEXT = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64, vocab_size=100,
            max_position_embeddings=16, eos_token_id=99, bos_token_id=98, pad_token_id=1)
VISION = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, image_size=32,
              patch_size=8)
# Padded like SigLIP's tokenizer pads (to max_length): the pooled last position holds padding.
IDS = torch.tensor([[5, 17, 42, 99] + [1] * 12, [7, 3, 99] + [1] * 13, [60, 61, 62, 63, 64, 99] + [1] * 10])


def _pixels(batch=2, seed=1, size=32):
  return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_siglip_model_matches_transformers(tmp_path):
  torch.manual_seed(0)
  hf = _perturbed(transformers.SiglipModel(transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)))
  hf.save_pretrained(tmp_path, safe_serialization=True)
  ours = pretrained.load(str(tmp_path))
  assert isinstance(ours, jclip.CLIPModel) and ours.visual_projection is None
  assert (ours.config.text.pooling, ours.config.text.causal, ours.config.vision.pooling) == ("last", False, "map")
  px = _pixels()
  with torch.no_grad():
    ref = hf(input_ids=IDS, pixel_values=px)
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the embedding.
    ref_img = hf.get_image_features(pixel_values=px).pooler_output
    ref_txt = hf.get_text_features(input_ids=IDS).pooler_output
    v = hf.vision_model(pixel_values=px, output_hidden_states=True)

  def forward(m, px, ids):
    img, txt = m.encode_image(px), m.encode_text(ids)
    states, _ = m.vision_model(px)
    return dict(img=img, txt=txt, logits=m.logits(img, txt), raw=states,
                normed=m.vision_model.post_layernorm(states), skip=m.vision_model(px, skip_last_layers=1)[0])

  out = _run(ours, forward, _nhwc(px), jnp.asarray(IDS.numpy()))
  errs = {"image_embeds": max_rel_err(out["img"], ref_img), "text_embeds": max_rel_err(out["txt"], ref_txt),
          "logits_per_image": max_rel_err(out["logits"], ref.logits_per_image),
          "vision_last_hidden": max_rel_err(out["normed"], v.last_hidden_state),
          "vision_hidden_-1": max_rel_err(out["raw"], v.hidden_states[-1]),
          "vision_skip1": max_rel_err(out["skip"], v.hidden_states[-2]),
          "logit_bias": max_rel_err(ours.logit_bias[...], hf.logit_bias.detach()[0])}
  print("max rel errors:", errs)
  _check(errs)


def test_siglip_vision_folder_is_our_vision_tower(tmp_path):
  torch.manual_seed(1)
  hf = _perturbed(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)))
  hf.save_pretrained(tmp_path, safe_serialization=True)
  ours = pretrained.load(str(tmp_path))
  assert isinstance(ours, vit.CLIPVisionModel) and not ours.config.pre_norm
  px = _pixels(seed=2)
  with torch.no_grad():
    ref = hf(pixel_values=px, output_hidden_states=True)
  (states, pooled), skip = _run(ours, lambda m, x: (m(x), m(x, skip_last_layers=1)[0]), _nhwc(px))
  errs = {"pooled": max_rel_err(pooled, ref.pooler_output), "hidden_-1": max_rel_err(states, ref.hidden_states[-1]),
          "skip1": max_rel_err(skip, ref.hidden_states[-2])}
  print("max rel errors:", errs)
  _check(errs)


def test_save_transformers_round_trip(tmp_path):
  text = jclip.CLIPTextConfig(vocab_size=80, context_length=12, width=32, layers=2, heads=2, mlp_dim=48,
                              act="gelu_tanh", pooling="last", causal=False, eos_token_id=79, pad_token_id=1)
  cfg = jclip.CLIPConfig(text=text, vision=vit.vit_config("test/8", image_size=24, act="gelu_tanh", pooling="map",
                                                          pre_norm=False, patch_bias=True),
                         embed_dim=32, logit_bias_init=-10.0, projections="siglip")
  ours = random_model(lambda: jclip.CLIPModel(cfg, rngs=nnx.Rngs(3)))
  siglip.save_transformers(ours, str(tmp_path / "model"))
  siglip.save_transformers(ours.vision_model, str(tmp_path / "vision"))
  hf = transformers.SiglipModel.from_pretrained(str(tmp_path / "model")).eval()
  hf_vision = transformers.SiglipVisionModel.from_pretrained(str(tmp_path / "vision")).eval()
  ids, px = torch.tensor([[3, 60, 79, 1, 1, 1], [4, 5, 6, 7, 8, 79]]), _pixels(seed=4, size=24)
  with torch.no_grad():
    ref = hf(input_ids=ids, pixel_values=px)  # its image_embeds/text_embeds are normalised: not ours to compare
    ref_img = hf.get_image_features(pixel_values=px).pooler_output
    ref_txt = hf.get_text_features(input_ids=ids).pooler_output
    ref_vision = hf_vision(pixel_values=px).pooler_output
  img, txt, logits = _run(ours, lambda m, x, i: (m.encode_image(x), m.encode_text(i),
                                                 m.logits(m.encode_image(x), m.encode_text(i))),
                          _nhwc(px), jnp.asarray(ids.numpy()))
  _check({"image_embeds": max_rel_err(img, ref_img), "text_embeds": max_rel_err(txt, ref_txt),
          "logits_per_image": max_rel_err(logits, ref.logits_per_image),
          "vision_folder": max_rel_err(img, ref_vision)})
  again = pretrained.load(str(tmp_path / "model"))  # and back into ours, unchanged
  loaded = dict(nnx.state(again, nnx.Param).flat_state())
  for path, var in nnx.state(ours, nnx.Param).flat_state():
    np.testing.assert_array_equal(loaded[path][...], var[...], err_msg=str(path))
  with pytest.raises(ValueError, match="CLIP's projections"):  # CLIP's exporter refuses a SigLIP model
    save_clip(ours, str(tmp_path / "clip"))


def test_missing_weight_is_one_line_error(tmp_path):
  from safetensors.numpy import load_file, save_file
  torch.manual_seed(0)
  transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).save_pretrained(tmp_path)
  state = load_file(str(tmp_path / "model.safetensors"))
  del state["head.probe"]
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(WeightsError, match="has no weight 'vision_model.head.probe'") as e:
    pretrained.load(str(tmp_path))
  assert "\n" not in str(e.value)
