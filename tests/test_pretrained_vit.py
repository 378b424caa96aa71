"""transformers `ViTForImageClassification` folders: logits parity on small random configs saved by its own
`save_pretrained` (transformers 5 key names), and the transformers 4 names hub checkpoints carry."""
import numpy as np
import pytest

from diffusion_jax import pretrained
from diffusion_jax.pretrained.vit import ViTClassifier, v5_layout
from diffusion_jax.pretrained.weights import WeightsError
from tests.torch_parity import max_rel_err, one_torch_thread, torch  # noqa: F401  (autouse fixture)

transformers = pytest.importorskip("transformers")


def _folder(tmp_path, **overrides):
  torch.manual_seed(0)
  fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                patch_size=4, num_channels=3, num_labels=5)
  ref = transformers.ViTForImageClassification(transformers.ViTConfig(**{**fields, **overrides})).eval()
  with torch.no_grad():  # norms start at scale 1, bias 0: perturb them so a swapped or dropped affine shows
    for name, p in ref.named_parameters():
      if "norm" in name or "cls_token" in name:
        p.add_(0.1 * torch.randn_like(p))
  folder = str(tmp_path / "vit")
  ref.save_pretrained(folder)
  return ref, folder


@pytest.mark.parametrize("channels", [3, 1])
def test_vit_classifier_logits_match_transformers(tmp_path, channels):
  ref, folder = _folder(tmp_path, num_channels=channels)
  clf = pretrained.load(folder)
  assert isinstance(clf, ViTClassifier)
  pixels = np.random.default_rng(0).normal(size=(3, 16, 16, channels)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).logits.numpy()
  got = np.asarray(clf(pixels))
  assert got.shape == (3, 5) and max_rel_err(got, want) <= 1e-4
  # And back: transformers reads our export to the same logits.
  from diffusion_jax.pretrained.vit import save_transformers
  save_transformers(clf, str(tmp_path / "export"))
  again = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "export")).eval()
  with torch.no_grad():
    assert max_rel_err(again(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).logits.numpy(), want) <= 1e-6


def transformers_4_names(v5: dict) -> dict:
  """transformers 4's spelling of a ViT (or ViTMAE) state dict in transformers 5's names, as hub checkpoints carry."""
  old = {}
  for key, value in v5.items():
    for new, was in ((".attention.q_proj.", ".attention.attention.query."),
                     (".attention.k_proj.", ".attention.attention.key."),
                     (".attention.v_proj.", ".attention.attention.value."),
                     (".attention.o_proj.", ".attention.output.dense."), (".mlp.fc1.", ".intermediate.dense."),
                     (".mlp.fc2.", ".output.dense.")):
      key = key.replace(new, was)
    old[key.replace("vit.layers.", "vit.encoder.layer.")] = value
  return old


def test_transformers_4_names_map_to_the_same_weights(tmp_path):
  ref, _ = _folder(tmp_path)
  v5 = {k: v.numpy() for k, v in ref.state_dict().items()}
  a, b = v5_layout(v5), v5_layout(transformers_4_names(v5))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  assert "vit.layers.1.attention.o_proj.weight" in a and a["vit.embeddings.cls_token"].shape == (32,)


def test_unsupported_config_is_one_line(tmp_path):
  _, folder = _folder(tmp_path, qkv_bias=False)
  with pytest.raises(WeightsError, match="qkv_bias=false is not supported"):
    pretrained.load(folder)
