"""LLaVA folders through `pretrained.load` and `ImageToText.from_pretrained`, against transformers.

One tiny random LlavaForConditionalGeneration (CLIP tower 32 px / patch 8 / 2 blocks read at vision_feature_layer
-2, Llama with grouped-query heads; one test has a SigLIP tower of that size) saved with its own save_pretrained,
next to a byte-level BPE tokenizer trained here and a LlavaProcessor. Every parameter is perturbed before saving so
unit norms and zero biases cannot hide a wrong mapping. Criterion for logits: max|ours - ref| / max|ref| <= 1e-4.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_jax import pretrained  # noqa: E402
from diffusion_jax.models.llava import LlavaModel  # noqa: E402
from diffusion_jax.pipelines.image_to_text import ImageProcessor, ImageToText  # noqa: E402
from diffusion_jax.pretrained.llava import config_from_transformers, save_transformers  # noqa: E402
from diffusion_jax.pretrained.weights import WeightsError  # noqa: E402

TOL = 1e-4
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_ID = SPECIALS.index("<image>")
# llava-hf's layout: the images of a turn first, then its text, under "ROLE: ".
TEMPLATE = ("{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
            "{{ message['role'].upper() + ': ' }}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
            "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
            "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def max_rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _tokenizer():
  """A byte-level BPE with Llama's conventions (a post-processor that prepends <s>), trained offline."""
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = ["USER: What is in the picture? ASSISTANT: A person in a white suit holding a helmet.",
            "Describe the image in one sentence."] * 10
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", SPECIALS.index("<s>"))])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              pad_token="<pad>", unk_token="<unk>",
                                              extra_special_tokens={"image_token": "<image>"})


def _save(folder, vocab, strategy="default", processor=None, tower=None):
  torch.manual_seed(0)
  tower = tower or transformers.CLIPVisionConfig
  config = transformers.LlavaConfig(
      vision_config=tower(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48),
      text_config=transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=3),
      image_token_id=IMAGE_ID, vision_feature_layer=-2, vision_feature_select_strategy=strategy,
      projector_hidden_act="gelu")
  model = transformers.LlavaForConditionalGeneration(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0) + 0.05 * torch.randn_like(p))
  model.save_pretrained(folder, safe_serialization=True)
  if processor is not None:
    processor.save_pretrained(folder)
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(transformers model, LlavaProcessor, folder with weights, tokenizer and processor, as transformers saves)."""
  tokenizer = _tokenizer()
  assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
  processor = transformers.LlavaProcessor(
      image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                      crop_size={"height": 32, "width": 32}),
      tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
      num_additional_image_tokens=1, chat_template=TEMPLATE)  # 1: the CLS token, as llava-hf folders say
  folder = str(tmp_path_factory.mktemp("llava"))
  model = _save(folder, len(tokenizer), processor=processor)
  return model, processor, folder


def _inputs(image_tokens, seed=0):
  """Two rows of text, the image's placeholder tokens and more text; NHWC pixels for ours, NCHW for transformers."""
  rng = np.random.RandomState(seed)
  text = lambda n: rng.randint(5, 300, (2, n))  # noqa: E731
  ids = np.concatenate([np.ones((2, 1)), text(3), np.full((2, image_tokens), IMAGE_ID), text(4)], 1)
  pixels = rng.randn(2, 32, 32, 3).astype(np.float32)
  return ids.astype(np.int32), pixels


def _logits(vlm, ids, pixels):
  """`vlm(ids, pixels)`, compiled as one program: op-by-op dispatch of the same call takes ~4x longer here."""
  graph, state = nnx.split(vlm)
  return jax.jit(lambda state, ids, pixels: nnx.merge(graph, state)(ids, pixels))(state, ids, pixels)


def _ref_logits(model, ids, pixels):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).logits.numpy()


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_logits_match_transformers(saved, strategy, tmp_path):
  model, processor, folder = saved
  if strategy != "default":
    folder = str(tmp_path)
    model = _save(folder, model.config.text_config.vocab_size, strategy)
  vlm = pretrained.load(folder)
  assert isinstance(vlm, LlavaModel) and vlm.config.skip_last_layers == 1
  n = 16 + (strategy == "full")  # 4x4 patches, plus the class token with 'full'
  assert vlm.config.num_image_tokens == n
  ids, pixels = _inputs(n)
  logits = _logits(vlm, ids, pixels)
  assert logits.dtype == np.float32 and logits.shape == (*ids.shape, model.config.text_config.vocab_size)
  err = max_rel_err(logits, _ref_logits(model, ids, pixels))
  assert err <= TOL, f"{strategy}: max relative logit error {err:.2e}"


def test_greedy_generation_matches_transformers(saved):
  model, processor, folder = saved
  vlm = pretrained.load(folder)
  ids, pixels = _inputs(16, seed=1)
  model.generation_config.eos_token_id = None  # neither side may stop early: compare all 32 tokens
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                         pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
                         attention_mask=torch.ones(ids.shape, dtype=torch.long), max_new_tokens=32,
                         do_sample=False, pad_token_id=3).numpy()
  ours = vlm.generate(ids, pixels, max_new_tokens=32)
  assert ours.dtype == np.int32 and ours.shape == (2, ids.shape[1] + 32) == ref.shape
  np.testing.assert_array_equal(ours, ref)


def test_export_round_trip(saved, tmp_path):
  from safetensors.numpy import load_file
  model, processor, folder = saved
  vlm = pretrained.load(folder)
  save_transformers(vlm, str(tmp_path))
  # The key layout transformers itself writes, so other tools reading the files see nothing unusual.
  assert sorted(load_file(str(tmp_path / "model.safetensors"))) == sorted(
      load_file(os.path.join(folder, "model.safetensors")))
  back = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  ids, pixels = _inputs(16, seed=2)
  ref = _ref_logits(model, ids, pixels)
  assert max_rel_err(_ref_logits(back, ids, pixels), ref) <= 1e-6
  assert max_rel_err(_logits(pretrained.load(str(tmp_path)), ids, pixels), ref) <= TOL


def test_siglip_tower_loads_and_exports(saved, tmp_path):
  """A SigLIP tower (no class token, MAP head): 'full' reads all 16 patches; 'default' drops the first patch as
  transformers does. The folder's keys (the head and post-norm included) are what export writes back."""
  from safetensors.numpy import load_file
  folder, out = str(tmp_path / "siglip"), str(tmp_path / "out")
  model = _save(folder, saved[0].config.text_config.vocab_size, "full", tower=transformers.SiglipVisionConfig)
  vlm = pretrained.load(folder)
  assert vlm.config.vision.pooling == "map" and vlm.config.num_image_tokens == 16
  ids, pixels = _inputs(16, seed=3)
  ref = _ref_logits(model, ids, pixels)
  err = max_rel_err(_logits(vlm, ids, pixels), ref)
  assert err <= TOL, f"siglip full: max relative logit error {err:.2e}"
  save_transformers(vlm, out)
  keys = sorted(load_file(os.path.join(folder, "model.safetensors")))
  assert any(k.startswith("vision_tower.head.attention.in_proj") for k in keys)
  assert sorted(load_file(os.path.join(out, "model.safetensors"))) == keys
  back = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  assert back.config.vision_config.model_type == "siglip_vision_model"
  assert max_rel_err(_ref_logits(back, ids, pixels), ref) <= 1e-6
  # 'default' (the same weights): transformers drops the first patch, so 15 image tokens on both sides.
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({**config, "vision_feature_select_strategy": "default"}, f)
  vlm = pretrained.load(out)
  assert vlm.config.num_image_tokens == 15
  ids, pixels = _inputs(15, seed=4)
  with torch.no_grad():
    ref = back(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)),
               vision_feature_select_strategy="default").logits.numpy()
  err = max_rel_err(_logits(vlm, ids, pixels), ref)
  assert err <= TOL, f"siglip default: max relative logit error {err:.2e}"


def test_image_to_text_pipeline_matches_transformers(saved):
  from skimage import data
  model, processor, folder = saved
  pipe = ImageToText.from_pretrained(folder)
  image = Image.fromarray(data.astronaut()).resize((56, 40))  # not square: resize and crop both act
  prompt = "What is in the picture?"
  messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
  ref = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
  # (1) pixels: transformers' processor (its PIL path) in NCHW, ours NHWC.
  pixels = ImageProcessor.from_folder(folder)(image)
  np.testing.assert_allclose(pixels, ref["pixel_values"][0].numpy().transpose(1, 2, 0), atol=1e-5)
  # (2) the prompt: chat template, one <s> (written by the template), the image token expanded to 16.
  ids = pipe.prompt_ids(prompt)
  assert ids == ref["input_ids"][0].tolist() and ids.count(IMAGE_ID) == 16
  # (3) the answer, greedy, allowed to stop at </s>.
  eos = processor.tokenizer.eos_token_id
  with torch.no_grad():
    out = model.generate(**ref, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=3)
  want = processor.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
  assert pipe([image], prompt, max_new_tokens=16) == [want]


def test_bad_folders_are_one_line_errors(saved, tmp_path):
  from safetensors.numpy import load_file, save_file
  model, processor, folder = saved
  weights = load_file(os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  missing = "multi_modal_projector.linear_2.weight"
  save_file({k: v for k, v in weights.items() if k != missing}, str(tmp_path / "model.safetensors"))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  with pytest.raises(WeightsError, match="has no weight 'linear_2.weight'") as e:
    pretrained.load(str(tmp_path))
  assert "\n" not in str(e.value) and "multi_modal_projector" in str(e.value)
  other = {"vision_config": {**config["vision_config"], "model_type": "dinov2"}}
  headless = {"vision_config": {**config["vision_config"], "model_type": "siglip_vision_model",
                                "vision_use_head": False}}
  for change, match in ((other, "vision tower 'dinov2' is not supported, only clip_vision_model or siglip"),
                        (headless, r"without a head \(vision_use_head=false\)"),
                        ({"vision_feature_layer": [-2, -1]}, r"vision_feature_layer .* \(one layer index only")):
    with pytest.raises(WeightsError, match=match) as e:
      config_from_transformers({**config, **change}, source="x")
    assert "\n" not in str(e.value)
