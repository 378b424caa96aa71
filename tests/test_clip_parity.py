"""Numeric parity with transformers' CLIP on small random models, in float32, through the public loaders.

Every transformers parameter is perturbed before saving, so zero biases or unit norms cannot hide a wrong
mapping. Criterion: max|ours - ref| / max|ref| <= 1e-4.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diffusion_jax import pretrained  # noqa: E402
from diffusion_jax.models import clip as jclip  # noqa: E402
from diffusion_jax.pretrained.clip import load_openai_state_dict, save_transformers  # noqa: E402
from diffusion_jax.pretrained.weights import WeightsError  # noqa: E402
from flax import nnx  # noqa: E402
from tests.test_clip_models import random_model  # noqa: E402

TOL = 1e-4


def max_rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref.detach().numpy() if hasattr(ref, "detach") else ref,
                                                       np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# name -> (transformers text config, vision config, projection_dim): widths, head counts, depths, patch and image
# sizes, channels, activations, eps and the two pooling rules (eos_token_id 2 selects argmax) all vary.
CONFIGS = {
    "argmax_quickgelu": (dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                              vocab_size=100, max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=2),
                         dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                              image_size=32, patch_size=8, hidden_act="quick_gelu"), 16),
    "eos_gelu": (dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=3, intermediate_size=80,
                      vocab_size=64, max_position_embeddings=12, hidden_act="gelu", eos_token_id=40,
                      layer_norm_eps=1e-6),
                 dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=3, intermediate_size=96,
                      image_size=28, patch_size=7, hidden_act="gelu", layer_norm_eps=1e-6), 24),
    "wide_tanh": (dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                       vocab_size=120, max_position_embeddings=20, hidden_act="gelu_pytorch_tanh", eos_token_id=119),
                  dict(hidden_size=64, num_attention_heads=8, num_hidden_layers=2, intermediate_size=96,
                       image_size=48, patch_size=16, num_channels=1, hidden_act="quick_gelu"), 32),
}


def _perturbed(model, seed=0):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0) + 0.05 * torch.randn_like(p))
  return model.eval()


def _hf_clip(name, seed=0):
  text, vision, proj = CONFIGS[name]
  torch.manual_seed(seed)
  cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)
  return _perturbed(transformers.CLIPModel(cfg), seed)


def _ids(text_cfg):
  """Ids with an end token, padding after it, and (for 'eos' pooling) a larger id before it, so argmax and
  first-EOS pooling pick different positions."""
  eos, vocab, ctx = text_cfg["eos_token_id"], text_cfg["vocab_size"], text_cfg["max_position_embeddings"]
  end = vocab - 1 if eos == 2 else eos
  rows = [[3, 7, end], [4, vocab - 2 if eos != 2 else 5, 9, 11, end], [6, end]]
  return torch.tensor([r + [0] * (ctx - 2 - len(r)) for r in rows])  # shorter than the context: a prefix


def _pixels(vision_cfg, batch=2, seed=1):
  g = torch.Generator().manual_seed(seed)
  s, c = vision_cfg["image_size"], vision_cfg.get("num_channels", 3)
  return torch.randn(batch, c, s, s, generator=g)


def _nhwc(px):
  return jnp.asarray(px.numpy().transpose(0, 2, 3, 1))


def _run(model, fn, *args):
  """fn(model, *args) under one jit: one XLA compile instead of one per primitive and shape, which is what makes
  eager runs of many small configs slow."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a))(state, *args)


def _check(errs):
  bad = {k: v for k, v in errs.items() if not v <= TOL}
  assert not bad, f"max rel err above {TOL}: {bad}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_clip_model_matches_transformers(name, tmp_path):
  hf = _hf_clip(name)
  hf.save_pretrained(tmp_path)
  ours = pretrained.load(str(tmp_path))
  assert isinstance(ours, jclip.CLIPModel)
  text_cfg, vision_cfg, _ = CONFIGS[name]
  assert ours.text_model.config.pooling == ("argmax" if text_cfg["eos_token_id"] == 2 else "eos")
  ids, px = _ids(text_cfg), _pixels(vision_cfg)
  jids, jpx = jnp.asarray(ids.numpy()), _nhwc(px)
  with torch.no_grad():
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected embedding.
    ref_img = hf.get_image_features(pixel_values=px).pooler_output
    ref_txt = hf.get_text_features(input_ids=ids).pooler_output
    t = hf.text_model(input_ids=ids, output_hidden_states=True)
    v = hf.vision_model(pixel_values=px, output_hidden_states=True)
    sd_skip = hf.text_model.final_layer_norm(t.hidden_states[-2])

  def forward(m, px, ids):
    return dict(call=m(px, ids), encode_image=m.encode_image(px), encode_text=m.encode_text(ids),
                text=m.text_model.encode(ids), text_call=m.text_model(ids),
                skip_raw=m.text_model(ids, skip_last_layers=1, final_norm=False),
                skip_normed=m.text_model(ids, skip_last_layers=1), vision=m.vision_model(px),
                vision_skip=m.vision_model(px, skip_last_layers=1)[0])

  out = _run(ours, forward, jpx, jids)
  (img, txt), (states, pooled), (vstates, vpooled) = out["call"], out["text"], out["vision"]
  _check({
      "image_embeds": max_rel_err(img, ref_img), "text_embeds": max_rel_err(txt, ref_txt),
      "encode_image": max_rel_err(out["encode_image"], ref_img),
      "encode_text": max_rel_err(out["encode_text"], ref_txt),
      "text_last_hidden": max_rel_err(states, t.last_hidden_state),
      "text_call": max_rel_err(out["text_call"], t.last_hidden_state),
      "text_pooled": max_rel_err(pooled, t.pooler_output),
      # SDXL/SD2 penultimate states: transformers' hidden_states[-2], which has no final layer norm.
      "text_skip1_raw": max_rel_err(out["skip_raw"], t.hidden_states[-2]),
      # diffusers' clip_skip for SD 1.x applies the final norm to that layer.
      "text_skip1_normed": max_rel_err(out["skip_normed"], sd_skip),
      "vision_last_hidden": max_rel_err(vstates, v.last_hidden_state),
      "vision_pooled": max_rel_err(vpooled, v.pooler_output),
      "vision_skip1": max_rel_err(out["vision_skip"], v.hidden_states[-2]),
  })


@pytest.mark.parametrize("cls_name", ["CLIPTextModel", "CLIPVisionModel", "CLIPTextModelWithProjection",
                                      "CLIPVisionModelWithProjection"])
def test_single_tower_folders_match_transformers(cls_name, tmp_path):
  text_cfg, vision_cfg, proj = CONFIGS["eos_gelu"]
  is_text = cls_name.startswith("CLIPText")
  cfg = (transformers.CLIPTextConfig if is_text else transformers.CLIPVisionConfig)(
      **(text_cfg if is_text else vision_cfg), projection_dim=proj)
  torch.manual_seed(0)
  hf = _perturbed(getattr(transformers, cls_name)(cfg))
  hf.save_pretrained(tmp_path)
  ours = pretrained.load(str(tmp_path))
  assert type(ours).__name__ == cls_name
  with torch.no_grad():
    if is_text:
      ids = _ids(text_cfg)
      ref = hf(input_ids=ids, output_hidden_states=True)
      ours_states, ours_out = _run(ours, lambda m, i: m(i) if "Projection" in cls_name else m.encode(i),
                                   jnp.asarray(ids.numpy()))
      ref_out = ref.text_embeds if "Projection" in cls_name else ref.pooler_output
    else:
      px = _pixels(vision_cfg)
      ref = hf(pixel_values=px, output_hidden_states=True)
      ours_states, ours_out = _run(ours, lambda m, x: m(x), _nhwc(px))
      ref_out = ref.image_embeds if "Projection" in cls_name else ref.pooler_output
  _check({"last_hidden": max_rel_err(ours_states, ref.last_hidden_state), "out": max_rel_err(ours_out, ref_out)})
  if cls_name == "CLIPTextModelWithProjection":  # SDXL's second encoder: penultimate states + projected pooled
    states, embeds = _run(ours, lambda m, i: m(i, skip_last_layers=1, final_norm=False), jnp.asarray(ids.numpy()))
    _check({"skip_states": max_rel_err(states, ref.hidden_states[-2]), "skip_embeds": max_rel_err(embeds, ref_out)})


def _to_openai(hf_model) -> dict:
  """transformers CLIPModel weights under OpenAI's names and shapes (what `clip.load` / open_clip hold)."""
  sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
  out = {"logit_scale": sd.pop("logit_scale"), "text_projection": sd.pop("text_projection.weight").T.contiguous(),
         "visual.proj": sd.pop("visual_projection.weight").T.contiguous()}
  towers = {"text_model.": "", "vision_model.": "visual."}
  simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
            "embeddings.position_embedding.weight": "positional_embedding",
            "embeddings.class_embedding": "class_embedding", "embeddings.patch_embedding.weight": "conv1.weight",
            "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
            "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
            "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"}
  block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
           "mlp.fc2": "mlp.c_proj"}
  for tower, new_prefix in towers.items():
    n_layers = len({k.split(".")[3] for k in sd if k.startswith(tower + "encoder.layers.")})
    for i in range(n_layers):
      src, dst = f"{tower}encoder.layers.{i}.", f"{new_prefix}transformer.resblocks.{i}."
      for kind in ("weight", "bias"):
        out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{src}self_attn.{n}_proj.{kind}") for n in "qkv"])
        for old, new in block.items():
          out[f"{dst}{new}.{kind}"] = sd.pop(f"{src}{old}.{kind}")
    for old, new in simple.items():
      if tower + old in sd:
        out[new_prefix + new] = sd.pop(tower + old)
  assert not sd, sorted(sd)
  return out


def _save_torchscript(state, path):
  """A TorchScript archive holding `state`, like the .pt files OpenAI's `clip.load` downloads."""
  class Node(torch.nn.Module):
    def forward(self, x):
      return x

  root = Node()
  for key, value in state.items():
    *parents, leaf = key.split(".")
    module = root
    for name in parents:
      if not hasattr(module, name):
        module.add_module(name, Node())
      module = getattr(module, name)
    module.register_parameter(leaf, torch.nn.Parameter(value.half(), requires_grad=False))  # OpenAI ships fp16
  torch.jit.trace(root, torch.zeros(1)).save(str(path))


def test_openai_state_dict_matches_transformers(tmp_path):
  # OpenAI/open_clip state dicts do not record the head count: it is width // 64, so heads are 64 wide here.
  text = dict(hidden_size=128, num_attention_heads=2, num_hidden_layers=2, intermediate_size=192, vocab_size=90,
              max_position_embeddings=10, eos_token_id=2)
  vision = dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=2, intermediate_size=128, image_size=24,
                patch_size=8)
  torch.manual_seed(0)
  hf = _perturbed(transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                                 projection_dim=16)))
  openai = _to_openai(hf)
  ids, px = _ids(text), _pixels(vision)
  with torch.no_grad():
    ref_img = hf.get_image_features(pixel_values=px).pooler_output
    ref_txt = hf.get_text_features(input_ids=ids).pooler_output
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in openai.items()}, str(tmp_path / "openai.safetensors"))
  torch.save({"state_dict": {"module." + k: v for k, v in openai.items()}}, tmp_path / "ddp.pt")
  _save_torchscript(openai, tmp_path / "jit.pt")
  for source in (openai, str(tmp_path / "openai.safetensors")):
    ours = load_openai_state_dict(source)
    cfg = ours.config
    assert (cfg.text.heads, cfg.vision.heads, cfg.vision.image_size, cfg.embed_dim, cfg.text.pooling) == \
        (2, 1, 24, 16, "argmax")
    img, txt = _run(ours, lambda m, x, i: m(x, i), _nhwc(px), jnp.asarray(ids.numpy()))
    _check({"image_embeds": max_rel_err(img, ref_img), "text_embeds": max_rel_err(txt, ref_txt)})
  with pytest.raises(WeightsError, match="allow_pickle"):
    load_openai_state_dict(str(tmp_path / "ddp.pt"))
  ours = load_openai_state_dict(str(tmp_path / "ddp.pt"), allow_pickle=True)  # DDP 'module.' prefix, nested dict
  _check({"image_embeds": max_rel_err(_run(ours, lambda m, x: m.encode_image(x), _nhwc(px)), ref_img)})
  with pytest.raises(WeightsError, match="allow_pickle"):
    load_openai_state_dict(str(tmp_path / "jit.pt"))
  ours = load_openai_state_dict(str(tmp_path / "jit.pt"), allow_pickle=True)  # OpenAI's own download format
  # The archive holds float16 weights, as OpenAI's do: parity is then to float16 rounding, not 1e-4.
  assert max_rel_err(_run(ours, lambda m, x: m.encode_image(x), _nhwc(px)), ref_img) < 3e-3
  broken = dict(openai)
  broken["transformer.resblocks.0.attn.in_proj_weight"] = broken["transformer.resblocks.0.attn.in_proj_weight"][:-3]
  with pytest.raises(WeightsError, match="shape") as e:
    load_openai_state_dict(broken)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("pooling", ["argmax", "eos"])
def test_save_transformers_round_trip(pooling, tmp_path):
  cfg = jclip.CLIPConfig(
      text=jclip.CLIPTextConfig(vocab_size=70, context_length=12, width=32, layers=2, heads=4, mlp_dim=48,
                                pooling=pooling, eos_token_id=50, act="gelu"),
      vision=jclip.vit_config("test/8", image_size=24, act="gelu_tanh"), embed_dim=20)
  ours = random_model(lambda: jclip.CLIPModel(cfg, rngs=nnx.Rngs(3)))
  save_transformers(ours, str(tmp_path))
  hf = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
  ids = torch.tensor([[3, 60, 50, 0, 0], [4, 5, 6, 50, 0]])  # 60 > eos: argmax and eos pooling differ
  px = _pixels(dict(image_size=24), seed=4)
  with torch.no_grad():
    ref_img = hf.get_image_features(pixel_values=px).pooler_output
    ref_txt = hf.get_text_features(input_ids=ids).pooler_output
    ref_scale = hf.logit_scale
  img, txt = _run(ours, lambda m, x, i: m(x, i), _nhwc(px), jnp.asarray(ids.numpy()))
  _check({"image_embeds": max_rel_err(img, ref_img), "text_embeds": max_rel_err(txt, ref_txt),
          "logit_scale": max_rel_err(ours.logit_scale[...], ref_scale)})
  again = pretrained.load(str(tmp_path))  # and back into ours, unchanged
  loaded = dict(nnx.state(again, nnx.Param).flat_state())
  for path, var in nnx.state(ours, nnx.Param).flat_state():
    np.testing.assert_array_equal(loaded[path][...], var[...], err_msg=str(path))


@pytest.mark.parametrize("cls_name", ["CLIPTextModelWithProjection", "CLIPVisionModel"])
def test_save_transformers_single_tower_round_trip(cls_name, tmp_path):
  if cls_name.startswith("CLIPText"):
    cfg = jclip.CLIPTextConfig(vocab_size=60, context_length=8, width=32, layers=2, heads=2, mlp_dim=64)
    ours = random_model(lambda: jclip.CLIPTextModelWithProjection(cfg, 12, rngs=nnx.Rngs(0)))
    inputs = torch.tensor([[3, 59, 1, 1], [2, 4, 59, 0]])
    ours_out = _run(ours, lambda m, i: m(i), jnp.asarray(inputs.numpy()))
  else:
    ours = random_model(lambda: jclip.CLIPVisionModel(jclip.vit_config("test/8", image_size=16), rngs=nnx.Rngs(0)))
    inputs = _pixels(dict(image_size=16))
    ours_out = _run(ours, lambda m, x: m(x), _nhwc(inputs))
  save_transformers(ours, str(tmp_path))
  hf = getattr(transformers, cls_name).from_pretrained(str(tmp_path)).eval()
  with torch.no_grad():
    ref = hf(inputs)
  ref_out = ref.text_embeds if cls_name.startswith("CLIPText") else ref.pooler_output
  _check({"last_hidden": max_rel_err(ours_out[0], ref.last_hidden_state), "out": max_rel_err(ours_out[1], ref_out)})


def test_save_transformers_refuses_what_transformers_cannot_express(tmp_path):
  cfg = jclip.CLIPConfig(text=jclip.CLIPTextConfig(vocab_size=20, context_length=8, width=16, layers=1, heads=2,
                                                   mlp_dim=32),
                         vision=jclip.vit_config("test/8", image_size=16, pooling="map"), embed_dim=8)
  with pytest.raises(ValueError, match="pooling 'map'"):
    save_transformers(nnx.eval_shape(lambda: jclip.CLIPModel(cfg, rngs=nnx.Rngs(0))), str(tmp_path))


def test_pickle_bin_needs_allow_pickle(tmp_path):
  hf = _hf_clip("argmax_quickgelu")
  hf.save_pretrained(tmp_path)
  os.remove(tmp_path / "model.safetensors")
  # transformers 5 writes safetensors whatever safe_serialization says, so write the legacy pickle directly.
  torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(WeightsError, match="allow_pickle") as e:
    pretrained.load(str(tmp_path))
  assert "\n" not in str(e.value)
  ours = pretrained.load(str(tmp_path), allow_pickle=True)
  px = _pixels(CONFIGS["argmax_quickgelu"][1])
  with torch.no_grad():
    ref = hf.get_image_features(pixel_values=px).pooler_output
  _check({"image_embeds": max_rel_err(_run(ours, lambda m, x: m.encode_image(x), _nhwc(px)), ref)})


def test_bad_weights_are_one_line_errors(tmp_path):
  from safetensors.numpy import load_file, save_file
  hf = _hf_clip("argmax_quickgelu")
  hf.save_pretrained(tmp_path)
  good = load_file(str(tmp_path / "model.safetensors"))
  cases = {
      "shape": {**good, "text_model.encoder.layers.1.mlp.fc1.weight": np.zeros((65, 32), np.float32)},
      "has no weight 'vision_model.post_layernorm.bias'":
          {k: v for k, v in good.items() if k != "vision_model.post_layernorm.bias"},
      "does not use": {**good, "text_model.extra.weight": np.zeros(3, np.float32)},
  }
  for message, state in cases.items():
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=message) as e:
      pretrained.load(str(tmp_path))
    assert "\n" not in str(e.value)
  config = json.loads((tmp_path / "config.json").read_text())
  config["text_config"]["hidden_act"] = "swish"
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(WeightsError, match="hidden_act 'swish'"):
    pretrained.load(str(tmp_path))
