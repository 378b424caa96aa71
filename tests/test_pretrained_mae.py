"""transformers `ViTMAEForPreTraining` folders: loss, reconstruction and mask parity on small random configs saved by
its own `save_pretrained`, given the same masking noise; and the export read back by transformers."""
import numpy as np
import pytest

from diffusion_jax import pretrained
from diffusion_jax.models.mae import MAE
from tests.test_pretrained_vit import transformers_4_names
from tests.torch_parity import max_rel_err, one_torch_thread, torch  # noqa: F401  (autouse fixture)

transformers = pytest.importorskip("transformers")


def _folder(tmp_path, **overrides):
  torch.manual_seed(0)
  fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                patch_size=4, num_channels=3, decoder_hidden_size=16, decoder_num_hidden_layers=2,
                decoder_num_attention_heads=2, decoder_intermediate_size=48, mask_ratio=0.75)
  ref = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(**{**fields, **overrides})).eval()
  with torch.no_grad():  # norms start at scale 1, bias 0 and the mask token near 0: perturb them so a swap shows
    for name, p in ref.named_parameters():
      if "norm" in name or "cls_token" in name or "mask_token" in name:
        p.add_(0.1 * torch.randn_like(p))
  folder = str(tmp_path / "mae")
  ref.save_pretrained(folder)
  return ref, folder


def _run_ref(ref, pixels, noise):
  with torch.no_grad():
    out = ref(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), noise=torch.from_numpy(noise))
  return out.loss.numpy(), out.logits.numpy(), out.mask.numpy()


@pytest.mark.parametrize("channels,norm_pix", [(3, False), (1, True)])
def test_mae_matches_transformers_given_the_noise(tmp_path, channels, norm_pix):
  ref, folder = _folder(tmp_path, num_channels=channels, norm_pix_loss=norm_pix)
  mae = pretrained.load(folder)
  assert isinstance(mae, MAE) and mae.config.norm_pix_loss == norm_pix
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(3, 16, 16, channels)).astype(np.float32)
  noise = rng.uniform(size=(3, 16)).astype(np.float32)
  want_loss, want_pred, want_mask = _run_ref(ref, pixels, noise)
  loss, pred, mask = mae(pixels, noise=noise)
  assert pred.shape == (3, 16, 16 * channels) and mask.shape == (3, 16)
  np.testing.assert_array_equal(np.asarray(mask), want_mask)  # 12 of 16 patches masked, the same ones
  assert np.asarray(mask).sum(axis=1).tolist() == [12, 12, 12]
  assert max_rel_err(np.asarray(pred), want_pred) <= 1e-4
  assert abs(float(loss) - float(want_loss)) <= 1e-4 * abs(float(want_loss))
  # And back: transformers reads our export to the same outputs.
  from diffusion_jax.pretrained.mae import save_transformers
  save_transformers(mae, str(tmp_path / "export"))
  again = transformers.ViTMAEForPreTraining.from_pretrained(str(tmp_path / "export")).eval()
  loss2, pred2, _ = _run_ref(again, pixels, noise)
  assert max_rel_err(pred2, want_pred) <= 1e-6 and abs(float(loss2) - float(want_loss)) <= 1e-6 * float(want_loss)


def test_transformers_4_decoder_names_load(tmp_path):
  """Hub checkpoints name decoder blocks `decoder.decoder_layers.{i}.attention.attention.query`; transformers 5's
  save_pretrained writes `decoder.decoder_encoder.layer.{i}...` (the folder the parity test above reads)."""
  ref, folder = _folder(tmp_path)
  from diffusion_jax.pretrained.mae import _MAE_UNBATCHED
  from diffusion_jax.pretrained.vit import v5_layout
  v5 = {k: v.numpy() for k, v in ref.state_dict().items()}
  old = transformers_4_names(v5)
  assert any(".decoder_layers.0.attention.attention.query." in k for k in old)  # the hub's decoder spelling
  a, b = v5_layout(v5, _MAE_UNBATCHED), v5_layout(old, _MAE_UNBATCHED)
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  from diffusion_jax.pretrained.weights import read_folder
  written = read_folder(folder)  # what save_pretrained wrote
  assert any(".decoder_encoder.layer.0." in k for k in written) or any(".decoder_layers.0." in k for k in written)
  saved = v5_layout(written, _MAE_UNBATCHED)
  assert sorted(saved) == sorted(a) and all(np.array_equal(saved[k], a[k]) for k in a)
  assert "decoder.decoder_layers.1.mlp.fc2.weight" in a and a["decoder.mask_token"].shape == (16,)


def test_mae_without_noise_needs_an_rng(tmp_path):
  _, folder = _folder(tmp_path)
  mae = pretrained.load(folder)
  pixels = np.zeros((2, 16, 16, 3), np.float32)
  with pytest.raises(ValueError, match="noise or an rng"):
    mae(pixels)
  with pytest.raises(ValueError, match=r"noise must be \[batch, 16\]"):
    mae(pixels, noise=np.zeros((2, 15), np.float32))
