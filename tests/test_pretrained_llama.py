"""Llama / Qwen2 folders through `pretrained.load`: logits, greedy generation and export against transformers.

Small random models in float32; every transformers parameter is perturbed before saving so unit norms and zero
biases cannot hide a wrong mapping. Criterion for logits: max|ours - ref| / max|ref| <= 1e-4.
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diffusion_jax import pretrained  # noqa: E402
from diffusion_jax.pretrained.llama import generation_defaults, save_transformers  # noqa: E402
from diffusion_jax.pretrained.weights import WeightsError  # noqa: E402

TOL = 1e-4
SIZES = dict(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48)
# Llama: untied head, grouped-query heads, head_dim apart from hidden/heads, biases everywhere, a non-default base.
# Qwen2: tied embeddings, biases on q/k/v only.
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SIZES, head_dim=16, attention_bias=True, mlp_bias=True,
                                              rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(**SIZES, tie_word_embeddings=True, rope_theta=10000.0),
}
MODELS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def max_rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
  """(name, transformers model, folder saved with its own save_pretrained)."""
  name = request.param
  torch.manual_seed(0)
  model = getattr(transformers, MODELS[name])(CONFIGS[name]()).eval()
  with torch.no_grad():
    for p in model.parameters():  # tied weights are one Parameter: perturbed once
      p.add_(0.3 * torch.randn_like(p) * (p.std() if p.numel() > 1 else 1.0) + 0.05 * torch.randn_like(p))
  folder = str(tmp_path_factory.mktemp(name))
  model.save_pretrained(folder, safe_serialization=True)
  return name, model, folder


def _ids(seed=0, batch=2, length=6):
  return np.random.RandomState(seed).randint(3, SIZES["vocab_size"], (batch, length)).astype(np.int32)


def _ref_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def test_logits_match_transformers(saved):
  name, model, folder = saved
  lm = pretrained.load(folder)
  ids = _ids()
  logits = lm(ids)
  assert logits.dtype == np.float32 and logits.shape == (2, 6, SIZES["vocab_size"])
  assert (lm.lm_head is None) == (name == "qwen2")
  err = max_rel_err(logits, _ref_logits(model, ids))
  assert err <= TOL, f"{name}: max relative logit error {err:.2e}"


def test_greedy_generation_matches_transformers(saved):
  name, model, folder = saved
  lm = pretrained.load(folder)
  ids = _ids(seed=1)
  model.generation_config.eos_token_id = None  # neither side may stop early: compare all 32 tokens
  with torch.no_grad():
    ref = model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                         max_new_tokens=32, do_sample=False, pad_token_id=0).numpy()
  ours = lm.generate(ids, max_new_tokens=32)
  assert ours.dtype == np.int32 and ours.shape == (2, 6 + 32) == ref.shape
  np.testing.assert_array_equal(ours, ref)


def test_export_round_trip(saved, tmp_path):
  name, model, folder = saved
  lm = pretrained.load(folder)
  save_transformers(lm, str(tmp_path))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  assert type(back).__name__ == MODELS[name]
  ids = _ids(seed=2)
  assert max_rel_err(_ref_logits(back, ids), _ref_logits(model, ids)) <= 1e-6
  assert max_rel_err(pretrained.load(str(tmp_path))(ids), _ref_logits(model, ids)) <= TOL


def test_generation_defaults_read_the_folder(saved):
  name, model, folder = saved
  defaults = generation_defaults(folder)
  eos = model.config.eos_token_id
  assert defaults["eos_token_ids"] == (() if eos is None else (eos,))
  assert defaults["bos_token_id"] == model.config.bos_token_id


def _copy_folder(src, dst, state=None, config=None):
  from safetensors.numpy import load_file, save_file
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(config or {})
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  weights = load_file(os.path.join(src, "model.safetensors"))
  save_file(state(weights) if state else weights, os.path.join(dst, "model.safetensors"))


def _one_line_error(folder, match):
  with pytest.raises(WeightsError, match=match) as e:
    pretrained.load(folder)
  assert "\n" not in str(e.value)


def test_bad_folders_are_one_line_errors(tmp_path):
  torch.manual_seed(0)
  src = str(tmp_path / "src")
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).save_pretrained(src, safe_serialization=True)
  missing = "model.layers.1.mlp.down_proj.weight"
  _copy_folder(src, str(tmp_path / "missing"), state=lambda w: {k: v for k, v in w.items() if k != missing})
  _one_line_error(str(tmp_path / "missing"), "has no weight 'model.layers.1.mlp.down_proj.weight'")
  _copy_folder(src, str(tmp_path / "extra"), state=lambda w: {**w, "model.layers.9.extra.weight": w[missing]})
  _one_line_error(str(tmp_path / "extra"), "1 weights the model does not use")
  _copy_folder(src, str(tmp_path / "wrong_shape"), state=lambda w: {**w, missing: w[missing][:, :-1]})
  _one_line_error(str(tmp_path / "wrong_shape"), f"weight {missing} has shape")
  truncated = tmp_path / "truncated"
  _copy_folder(src, str(truncated))
  data = (truncated / "model.safetensors").read_bytes()
  (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
  _one_line_error(str(truncated), "cannot read safetensors file")
  for rope in ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
               {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}):
    bad = tmp_path / f"rope_{len(os.listdir(tmp_path))}"
    _copy_folder(src, str(bad), config=rope)
    _one_line_error(str(bad), "rope type '(llama3|linear)' is not supported")


def test_peft_adapters_on_the_language_model_match_peft(saved, tmp_path):
  """A peft LoRA folder on every linear layer of the LM (as `PeftModel.save_pretrained` writes it for a causal LM)
  adapts ours to the PyTorch adapted model's logits; our export is read back by peft to the same logits."""
  peft = pytest.importorskip("peft")
  from diffusion_jax.pretrained.llama import llama_key
  from diffusion_jax.pretrained.lora import load_peft, save_peft
  name, model, folder = saved
  base = getattr(transformers, MODELS[name]).from_pretrained(folder).eval()
  torch.manual_seed(1)
  adapted = peft.get_peft_model(base, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
      init_lora_weights=False, task_type="CAUSAL_LM")).eval()
  adapted.save_pretrained(str(tmp_path / "adapter"))
  ids = _ids(seed=3)
  want = _ref_logits(adapted, ids)
  assert max_rel_err(_ref_logits(model, ids), want) > 1e-2  # the adapters matter
  lm = pretrained.load(folder)
  names = load_peft(lm, str(tmp_path / "adapter"), key=llama_key, prefix="")
  assert len(names) == 7 * SIZES["num_hidden_layers"]
  assert max_rel_err(lm(ids), want) <= TOL
  save_peft(lm, str(tmp_path / "ours"), key=llama_key, prefix="")
  fresh = getattr(transformers, MODELS[name]).from_pretrained(folder).eval()
  back = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "ours")).eval()
  assert max_rel_err(_ref_logits(back, ids), want) <= TOL
