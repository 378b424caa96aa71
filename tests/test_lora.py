"""LoRA adapters (`models.lora`): injection by regex and preset, the adapted output against its formula, merge and
unmerge in place, and peft adapter folders made by peft's own `save_pretrained` on a transformers CLIP text encoder:
the adapted model equals peft's, and our export is read back by peft to the same outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models import lora
from diffusion_jax.models.clip import CLIPTextConfig, CLIPTextModel
from diffusion_jax.pretrained.weights import WeightsError


def _text_model():
  return CLIPTextModel(CLIPTextConfig(vocab_size=50, context_length=8, width=16, layers=2, heads=2, mlp_dim=32),
                       rngs=nnx.Rngs(0))


def test_injection_targets_merge_and_unmerge():
  m = _text_model()
  ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 50
  base = m(ids)
  names = lora.inject(m, lora.LoRAConfig(rank=4, alpha=8, targets=("attention", r"mlp\.fc1$")), rngs=nnx.Rngs(1))
  assert names == sorted(f"layers.{i}.{n}" for i in range(2) for n in ("attn.key", "attn.out", "attn.query",
                                                                       "attn.value", "mlp.fc1"))
  np.testing.assert_array_equal(m(ids), base)  # B starts at zero: the adapted model is the base
  layer = m.layers[0].attn.query
  for module in lora.adapted(m).values():
    module.lora.b[...] = jax.random.normal(jax.random.key(0), module.lora.b.shape)
  x = jax.random.normal(jax.random.key(2), (3, 16))
  want = x @ layer.kernel[...] + layer.bias[...] + 2.0 * (x @ layer.lora.a[...] @ layer.lora.b[...])  # alpha/r = 2
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)
  adapted = m(ids)
  assert not np.allclose(adapted, base)
  kernel = np.asarray(layer.kernel[...])
  lora.merge(m)
  np.testing.assert_allclose(m(ids), adapted, atol=2e-5)
  lora.unmerge(m)
  np.testing.assert_allclose(layer.kernel[...], kernel, atol=1e-6)
  np.testing.assert_allclose(m(ids), adapted, atol=2e-5)
  assert len(jax.tree.leaves(nnx.state(m, lora.LoRAParam))) == 2 * len(names)
  rs = lora.LoRAConfig(rank=4, alpha=8, rslora=True)
  assert rs.scale == pytest.approx(4.0)
  with pytest.raises(ValueError, match="match no linear, convolution or embedding layer"):
    lora.inject(_text_model(), lora.LoRAConfig(rank=2, alpha=2, targets=("nothing_here$",)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not a preset"):
    lora.LoRAConfig(rank=2, alpha=2, targets=("(",))


def _peft_folders(tmp_path, **lora_kw):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  torch.manual_seed(0)
  base = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
  base.save_pretrained(str(tmp_path / "base"))
  config = peft.LoraConfig(init_lora_weights=False, **lora_kw)  # random A and B: the adapters change the output
  ref = peft.get_peft_model(base, config).eval()
  ref.save_pretrained(str(tmp_path / "adapter"))
  return torch, peft, ref


@pytest.mark.parametrize("lora_kw", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"]),
    dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["k_proj", "out_proj", "fc2"],
         rank_pattern={"fc2": 3}, alpha_pattern={"out_proj": 5}),
    dict(r=3, lora_alpha=4, target_modules=["token_embedding", "q_proj"])])  # an embedding table too
def test_peft_adapters_match_peft_and_export_back(tmp_path, lora_kw):
  from diffusion_jax import pretrained
  from diffusion_jax.pretrained.lora import load_peft, save_peft
  from tests.torch_parity import max_rel_err
  torch, peft, ref = _peft_folders(tmp_path, **lora_kw)
  model = pretrained.load(str(tmp_path / "base"))
  names = load_peft(model, str(tmp_path / "adapter"))
  from diffusion_jax.pretrained.weights import read_file
  saved = read_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
  assert len(names) == len([k for k in saved if "lora_A" in k or "lora_embedding_A" in k]) >= 3
  ids = np.random.default_rng(0).integers(3, 99, size=(2, 16)).astype(np.int32)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  got = np.asarray(model(jnp.asarray(ids)))
  assert max_rel_err(got, want) <= 1e-4
  save_peft(model, str(tmp_path / "export"), base_model_class="CLIPTextModel")
  import transformers
  base = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "base")).eval()
  again = peft.PeftModel.from_pretrained(base, str(tmp_path / "export")).eval()
  with torch.no_grad():
    back = again(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  assert max_rel_err(back, want) <= 1e-5
  # Hot swap: adapters are state, so a compiled program of the model takes another adapter's weights unchanged.
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
  for module in lora.adapted(model).values():
    module.lora.b[...] = jnp.zeros_like(module.lora.b[...])
  zeroed = np.asarray(run(nnx.state(model), jnp.asarray(ids)))
  load_peft(model, str(tmp_path / "export"))
  assert nnx.split(model)[0] == graphdef
  assert max_rel_err(np.asarray(run(nnx.state(model), jnp.asarray(ids))), want) <= 1e-4
  assert not np.allclose(zeroed, want) and run._cache_size() == 1


def test_bad_adapter_folders_are_one_line(tmp_path):
  from diffusion_jax.pretrained.lora import load_peft
  with pytest.raises(WeightsError, match="no adapter_config.json"):
    load_peft(_text_model(), str(tmp_path))
  (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
  with pytest.raises(WeightsError, match="DoRA"):
    load_peft(_text_model(), str(tmp_path))


def test_lora_run_trains_only_adapters_on_a_finished_run_and_exports_to_peft(tmp_path):
  """A tiny ViT classifier run is the base; a LoRA run on it keeps the base frozen (restored from the run at every
  start, checkpoints holding the adapters only) and its adapters, saved in peft's layout, turn transformers' copy of
  the base into the same classifier."""
  from configs.mnist_vit import get_config
  from diffusion_jax.config import ConfigError
  from diffusion_jax.pretrained.lora import save_peft
  from diffusion_jax.pretrained.vit import save_transformers, vit_key
  from diffusion_jax.train import parts
  from diffusion_jax.train.trainer import Trainer
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  c = get_config("tiny")
  c.model.pooling = "cls"
  base = Trainer(c, str(tmp_path / "base"))
  base_state = base.train()
  base_params = parts.flat_names(base_state.params["main"])

  c.lora.update(rank=2, alpha=4.0, under="vision_model", base_workdir=str(tmp_path / "base"))
  c.train.steps = 6
  run = Trainer(c, str(tmp_path / "lora"))
  state = run.train(stop_at=3)
  trained = parts.flat_names(state.params["main"])
  assert trained and all(".lora." in k for k in trained) and len(trained) == 2 * 4 * 2  # a, b × q k v o × 2 layers
  run = Trainer(c, str(tmp_path / "lora"))  # resumed: the frozen base comes back from the base run
  state = run.train()
  frozen = parts.flat_names(run.frozen)
  for k, v in base_params.items():
    np.testing.assert_array_equal(np.asarray(frozen[k]), np.asarray(v))
  assert any(np.abs(np.asarray(v)).max() > 0 for k, v in parts.flat_names(state.params["main"]).items()
             if k.endswith("lora.b"))

  model = run.model_context(state).merge()
  pixels = np.random.default_rng(0).uniform(-1, 1, size=(4, 28, 28, 1)).astype(np.float32)
  save_transformers(base.model_context(base_state).merge(), str(tmp_path / "hf_base"))
  save_peft(model, str(tmp_path / "hf_adapter"), key=vit_key, base_model_class="ViTForImageClassification")
  ref = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "hf_base")).eval()
  ref = peft.PeftModel.from_pretrained(ref, str(tmp_path / "hf_adapter")).eval()
  with torch.no_grad():
    want = ref(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(pixels)), want, rtol=1e-4, atol=1e-5)

  c.lora.targets = ("no_such_layer$",)
  with pytest.raises(ConfigError, match="lora: LoRA targets .* match no linear, convolution or embedding layer under vision_model"):
    Trainer(c, str(tmp_path / "bad"))


def test_diffusers_lora_file_adapts_the_sd_unet_and_text_encoder_as_diffusers_does_and_exports_back(tmp_path):
  """A Stable-Diffusion-shaped U-Net and CLIP text encoder with peft adapters on their attention, the U-Net's 1 × 1
  and 3 × 3 convolutions and the text encoder's MLP, saved by diffusers' own `save_lora_weights` into one file: each component adapted here equals the
  PyTorch adapted one."""
  from diffusion_jax import pretrained
  from diffusion_jax.pretrained.lora import load_diffusers_lora, save_diffusers_lora
  from tests.test_unet_parity import CONFIGS, _inputs, _jax_eps, _saved_diffusers_unet, _torch_eps
  from tests.torch_parity import max_rel_err
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from peft.utils import get_peft_model_state_dict
  kwargs, size, text_len = CONFIGS["sd1_heads_conv"]
  ref, folder = _saved_diffusers_unet(tmp_path, kwargs)
  # Attention projections, and convolutions: the 1 × 1 `proj_in` and the resnets' 3 × 3 `conv1` (LoCon).
  ref.add_adapter(peft.LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                    "conv1"], init_lora_weights=False))
  torch.manual_seed(1)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
  text.save_pretrained(str(tmp_path / "text"))
  text.add_adapter(peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "fc1"], init_lora_weights=False))
  diffusers.StableDiffusionPipeline.save_lora_weights(
      str(tmp_path / "lora"), unet_lora_layers=get_peft_model_state_dict(ref),
      text_encoder_lora_layers=get_peft_model_state_dict(text),
      unet_lora_adapter_metadata=ref.peft_config["default"].to_dict(),
      text_encoder_lora_adapter_metadata=text.peft_config["default"].to_dict())

  unet = pretrained.load(folder)
  names = load_diffusers_lora(unet, str(tmp_path / "lora"), "unet")
  lora_a = [k for k in get_peft_model_state_dict(ref) if k.endswith("lora_A.weight")]
  assert len(names) == len(lora_a) and any(n.endswith("conv1") for n in names) and any("proj_in" in n for n in names)
  x, t, ctx = _inputs(ref.config.in_channels, size, text_len, ref.config.cross_attention_dim)
  want = _torch_eps(ref.eval(), x, t, ctx)
  with torch.no_grad():
    ref.disable_adapters()
    base = _torch_eps(ref, x, t, ctx)
  assert max_rel_err(base, want) > 1e-2  # the adapters matter, so matching `want` means they are applied
  assert max_rel_err(_jax_eps(unet, x, t, ctx), want) <= 1e-4
  # And back: our export, read by diffusers' own loader onto a fresh copy of the base, adapts it the same way.
  save_diffusers_lora(unet, str(tmp_path / "ours"))
  fresh = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
  state, _, metadata = diffusers.StableDiffusionPipeline.lora_state_dict(str(tmp_path / "ours"),
                                                                         return_lora_metadata=True)
  fresh.load_lora_adapter(state, prefix="unet", metadata=metadata)
  assert max_rel_err(_torch_eps(fresh, x, t, ctx), want) <= 1e-4

  encoder = pretrained.load(str(tmp_path / "text"))
  assert len(load_diffusers_lora(encoder, str(tmp_path / "lora"), "text_encoder")) == 4
  ids = np.random.default_rng(0).integers(3, 99, size=(2, 16)).astype(np.int32)
  with torch.no_grad():
    want = text(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  assert max_rel_err(np.asarray(encoder(jnp.asarray(ids))), want) <= 1e-4
  from diffusion_jax.pretrained.clip import hf_key
  with pytest.raises(WeightsError, match="no linear or convolution layer of this model is named"):  # the U-Net's part, elsewhere
    load_diffusers_lora(pretrained.load(str(tmp_path / "text")), str(tmp_path / "lora"), "unet", key=hf_key)


def test_convolution_adapters_convolve_like_their_base_and_merge():
  from diffusion_jax.models import layers

  class Net(nnx.Module):
    def __init__(self):
      self.down = layers.conv(3, 8, 3, strides=2, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.down(x)

  net = Net()
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  base = net(x)
  assert lora.inject(net, lora.LoRAConfig(rank=2, alpha=2, targets=("all-linear",)), rngs=nnx.Rngs(1)) == ["down"]
  net.down.lora.b[...] = jax.random.normal(jax.random.key(1), net.down.lora.b.shape)
  assert net.down.lora.a.shape == (3, 3, 3, 2) and net.down.lora.b.shape == (1, 1, 2, 8)
  adapted = net(x)
  assert adapted.shape == base.shape == (2, 5, 5, 8) and not np.allclose(adapted, base)
  lora.merge(net)
  np.testing.assert_allclose(net(x), adapted, rtol=1e-5, atol=1e-5)
  lora.unmerge(net)
  np.testing.assert_allclose(net(x), adapted, rtol=1e-5, atol=1e-5)


def test_kohya_lora_file_adapts_the_sd_unet_by_its_definition_and_as_diffusers_converts_it(tmp_path):
  """A kohya / A1111 file (underscored module names, lora_down / lora_up, an alpha per module; linear layers and the
  1 × 1 `proj_in` convolution) adapts our U-Net as the file's definition says — each kernel plus alpha / r · up·down,
  merged by hand into the PyTorch U-Net — and, with one alpha for all modules, as diffusers' own converter
  (`lora_state_dict` + `load_lora_into_unet`) adapts it."""
  from diffusion_jax import pretrained
  from diffusion_jax.pretrained.lora import load_kohya_lora
  from tests.test_unet_parity import CONFIGS, _inputs, _jax_eps, _saved_diffusers_unet, _torch_eps
  from tests.torch_parity import max_rel_err
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  pytest.importorskip("peft")
  from safetensors.torch import save_file
  kwargs, size, text_len = CONFIGS["sd1_heads_conv"]
  ref, folder = _saved_diffusers_unet(tmp_path, kwargs)
  x, t, ctx = _inputs(ref.config.in_channels, size, text_len, ref.config.cross_attention_dim)
  gen = torch.Generator().manual_seed(3)
  state, rank, modules = {}, 4, {}
  for name, module in ref.named_modules():
    if name.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn1.to_out.0", "proj_in")):
      base = f"lora_unet_{name.replace('.', '_')}"
      window = tuple(module.weight.shape[2:])
      state[f"{base}.lora_down.weight"] = 0.3 * torch.randn((rank, module.weight.shape[1], *window), generator=gen)
      state[f"{base}.lora_up.weight"] = 0.3 * torch.randn((module.weight.shape[0], rank, *[1] * len(window)),
                                                          generator=gen)
      state[f"{base}.alpha"] = torch.tensor(float(torch.randint(1, 9, (1,), generator=gen)))
      modules[base] = module
  save_file(state, str(tmp_path / "kohya.safetensors"))
  unet = pretrained.load(folder)
  names = load_kohya_lora(unet, str(tmp_path / "kohya.safetensors"))
  assert len(names) == len(modules) and any(n.endswith("proj_in") for n in names)
  with torch.no_grad():
    for base, module in modules.items():
      up, down = state[f"{base}.lora_up.weight"].flatten(1), state[f"{base}.lora_down.weight"].flatten(1)
      module.weight += (state[f"{base}.alpha"] / rank * (up @ down)).view(module.weight.shape)
  want = _torch_eps(ref.eval(), x, t, ctx)
  assert max_rel_err(_jax_eps(unet, x, t, ctx), want) <= 1e-4

  ref, folder = _saved_diffusers_unet(tmp_path / "again", kwargs)
  for key in state:
    if key.endswith(".alpha"):
      state[key] = torch.tensor(3.0)
  save_file(state, str(tmp_path / "uniform.safetensors"))
  unet = pretrained.load(folder)
  load_kohya_lora(unet, str(tmp_path / "uniform.safetensors"))
  sd, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(tmp_path / "uniform.safetensors"))
  diffusers.StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet=ref)
  assert max_rel_err(_jax_eps(unet, x, t, ctx), _torch_eps(ref.eval(), x, t, ctx)) <= 1e-4
  with pytest.raises(WeightsError, match="holds no text_encoder adapters"):
    load_kohya_lora(pretrained.load(folder), str(tmp_path / "kohya.safetensors"), "text_encoder")


def test_several_weighted_adapters_at_once_equal_peft_with_both_active(tmp_path):
  """Two peft adapters (different ranks, alphas and layers) combined with weights 0.5 and 1.5 equal peft's model with
  both adapters active and its per-adapter scales multiplied by those weights."""
  from diffusion_jax import pretrained
  from diffusion_jax.pretrained.lora import load_peft
  from tests.torch_parity import max_rel_err
  torch, peft, ref = _peft_folders(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
  second = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["v_proj", "fc1"], init_lora_weights=False)
  ref.add_adapter("second", second)
  ref.save_pretrained(str(tmp_path / "both"))  # the second adapter lands in both/second
  ref.base_model.set_adapter(["default", "second"])
  for module in ref.modules():
    if isinstance(module, peft.tuners.lora.LoraLayer):
      for name, weight in (("default", 0.5), ("second", 1.5)):
        if name in module.scaling:
          module.set_scale(name, weight)
  ids = np.random.default_rng(0).integers(3, 99, size=(2, 16)).astype(np.int32)
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  model = pretrained.load(str(tmp_path / "base"))
  load_peft(model, str(tmp_path / "adapter"), weight=0.5)
  names = load_peft(model, str(tmp_path / "both" / "second"), weight=1.5, combine=True)
  assert len(names) == 4 and model.layers[0].attn.value.lora.a.shape == (32, 6)  # rank 4 + 2 where both adapt
  assert max_rel_err(np.asarray(model(jnp.asarray(ids))), want) <= 1e-4
  with pytest.raises(WeightsError, match="combine=True"):
    load_peft(model, str(tmp_path / "adapter"))  # rank 4 onto the combined rank-6 adapter, without combine


def test_embedding_adapters_add_looked_up_rows_and_merge():
  m = _text_model()
  ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 50
  base = m(ids)
  assert lora.inject(m, lora.LoRAConfig(rank=3, alpha=6, targets=(r"token_embedding$",)),
                     rngs=nnx.Rngs(1)) == ["token_embedding"]
  table = m.token_embedding
  assert table.lora.a.shape == (50, 3) and table.lora.b.shape == (3, 16) and not np.any(table.lora.a[...])
  np.testing.assert_array_equal(m(ids), base)  # A starts at zero, as peft's embedding adapters do
  table.lora.a[...] = jax.random.normal(jax.random.key(0), (50, 3))
  rows = table(ids)
  want = table.embedding[...][ids] + 2.0 * (table.lora.a[...][ids] @ table.lora.b[...])
  np.testing.assert_allclose(rows, want, rtol=1e-5, atol=1e-5)
  adapted = m(ids)
  lora.merge(m)
  np.testing.assert_allclose(m(ids), adapted, atol=2e-5)
  lora.unmerge(m)
  np.testing.assert_allclose(m(ids), adapted, atol=2e-5)
