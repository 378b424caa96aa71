"""FID's InceptionV3 against torch-fidelity's port of the same TensorFlow graph (random weights saved as the
pytorch-fid state dict), the clean-fid resize, the Fréchet distance against a scipy reference, KID and
precision/recall against direct formulas, and the `python -m diffusion_jax.eval.fid` command line."""
import copy
import os

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from benchmarks.reference import torch_fidelity_inception
from diffusion_jax.eval import fid
from tests.torch_parity import max_rel_err, one_torch_thread, torch  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """torch-fidelity's InceptionV3 with random weights and batch-norm statistics measured on random images (so every
  layer is normalised as in the real network), and its state dict saved as pytorch-fid's .pth and as safetensors."""
  torch.manual_seed(0)  # before the network is built: its initial weights are drawn then
  net = torch_fidelity_inception(("64", "192", "768", "2048", "logits_unbiased", "logits"))
  if net is None:
    pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batch
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
    net.train()
    net((torch.rand(4, 3, 299, 299) * 255).to(torch.uint8))
    net.fc.weight.normal_(0.0, 0.02)
  net.eval()
  folder = tmp_path_factory.mktemp("inception")
  pth = str(folder / "pt_inception.pth")
  torch.save(net.state_dict(), pth)
  from diffusion_jax.pretrained.inception import main as convert
  safetensors = str(folder / "inception.safetensors")
  convert([pth, safetensors])
  return net, pth, safetensors


def test_inception_features_match_torch_fidelity(reference):
  net, pth, safetensors = reference
  from diffusion_jax.pretrained.inception import load_inception
  images = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  # The reference runs in float64 (torch-fidelity's own option): through 94 layers float32 rounding alone moves the
  # 2048-d features by ~1e-4 relative in either framework, so the exact values are the fair target.
  net64 = copy.deepcopy(net).to(torch.float64)
  net64.feature_extractor_internal_dtype = torch.float64
  with torch.no_grad():
    want = net64(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
  want = dict(zip(net.features_list, (w.numpy() for w in want)))
  ours = load_inception(safetensors)
  got = ours(np.asarray((images.astype(np.float32) - 128.0) / 128.0))
  for name in ("64", "192", "768", "2048", "logits"):
    assert max_rel_err(got[name], want[name]) <= 1e-4, name
  assert np.std(want["2048"]) > 1e-3  # the features are not degenerate
  # The .pth itself reads with allow_pickle (through torch), and is refused without it.
  np.testing.assert_array_equal(np.asarray(load_inception(pth, allow_pickle=True).fc.kernel.value),
                                np.asarray(ours.fc.kernel.value))
  from diffusion_jax.pretrained.weights import WeightsError
  with pytest.raises(WeightsError, match="pickle file"):
    load_inception(pth)


def test_clean_resize_matches_clean_fid():
  resize = pytest.importorskip("cleanfid.resize")
  image = np.random.default_rng(1).integers(0, 256, (28, 28, 3), dtype=np.uint8)
  want = resize.make_resizer("PIL", False, "bicubic", (299, 299))(image)
  np.testing.assert_array_equal(fid.clean_resize(image[None])[0], want)


def test_frechet_distance_matches_the_scipy_formula_and_refuses_too_few_images():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(400, 16))
  b = rng.normal(0.3, 1.2, size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.3
  mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
  mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
  assert abs(fid.fid_from_features(a, b) - want) <= 1e-6 * max(1.0, want)
  assert abs(fid.fid_from_features(a, a)) < 1e-6
  with pytest.raises(ValueError, match="generated images: 10 images give a singular 16×16 covariance"):
    fid.fid_from_features(a, b[:10])


def test_kid_is_the_unbiased_polynomial_mmd_and_precision_recall_count_neighbourhoods():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(30, 5)), rng.normal(0.5, 1.0, size=(30, 5))
  # With whole sets as the one subset, KID is the plain unbiased estimator, written out term by term.
  k = lambda a, b: (a @ b / 5 + 1) ** 3
  n = 30
  xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
  mean, std = fid.kid(x, y, num_subsets=1, subset_size=n)
  assert abs(mean - (xx + yy - 2 * xy)) < 1e-9 and std == 0.0
  same, _ = fid.kid(x, rng.normal(size=(30, 5)), num_subsets=5, subset_size=20)
  assert abs(same) < mean / 3  # another draw of x's distribution is much closer than the shifted one

  # Points on a line: reals at 0..9 (the 3rd neighbour of each is 3 away, 2.. at the inner points), fakes far off.
  real = np.arange(10.0)[:, None]
  assert fid.precision_recall(real, real + 0.5) == (1.0, 1.0)
  precision, recall = fid.precision_recall(real, np.concatenate([real[:5] + 0.5, real[:5] + 100.0]))
  assert precision == 0.5 and recall < 1.0


def test_command_line_scores_folders_and_saved_statistics(tmp_path, capsys):
  rng = np.random.default_rng(0)
  for name, shift in (("real", 0), ("fake", 40)):
    os.makedirs(tmp_path / name)
    for i in range(12):
      pixels = np.clip(rng.normal(120 + shift, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(tmp_path / name / f"{i:03d}.png")
  # A stand-in feature net (the mean colour and its spread) keeps the test to the command line's own work.
  features = lambda images, desc="": np.concatenate([images.mean((1, 2)), images.std((1, 2))], axis=1)
  stats = str(tmp_path / "real.npz")
  out = fid.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--kid", "--save-stats", stats],
                 features_fn=features)
  assert out["fid"] > 100 and out["kid"] > 0
  real = features(fid.read_folder(str(tmp_path / "real")))
  np.testing.assert_allclose(np.load(stats)["mu"], real.mean(0))
  again = fid.main(["--real", stats, "--fake", str(tmp_path / "fake")], features_fn=features)
  assert abs(again["fid"] - out["fid"]) < 1e-9
  assert "fid: " in capsys.readouterr().out
  with pytest.raises(SystemExit):
    fid.main(["--real", stats, "--fake", str(tmp_path / "fake"), "--kid"], features_fn=features)
  assert capsys.readouterr().err.strip() == ("error: --kid, --precision-recall and --save-stats need real images, "
                                             "not statistics")
  with pytest.raises(SystemExit):
    fid.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "nowhere")])
  assert capsys.readouterr().err.strip().startswith("error: --inception is required")


def test_fid_evaluator_scores_a_runs_samples_on_the_digit_features(tmp_path):
  from configs.mnist_ddpm import get_config
  from diffusion_jax.config import ConfigError
  from diffusion_jax.defaults import evaluator
  from diffusion_jax.train.evaluators import make_evaluators
  from diffusion_jax.train.task import get_task
  from diffusion_jax.train.trainer import Trainer
  from tests.runs import saved_run
  config = get_config("tiny")
  config.evals = {"fid": evaluator("fid", features="digits", num_samples=256, precision_recall=True)}
  config.sample.batch_size = 128
  saved_run(config, str(tmp_path))
  got = Trainer(config, str(tmp_path)).evaluate()
  # An untrained model's samples are noise: far from the digits, and outside their manifold.
  assert got["eval/fid_digits"] > 100 and got["eval/fid_digits_kid"] > 0.01
  assert got["eval/fid_digits_precision"] < 0.2
  config.evals = {"fid": evaluator("fid", inception=str(tmp_path / "missing.safetensors"))}
  with pytest.raises(ConfigError, match="evals.fid.inception=.* is not a file"):
    make_evaluators(get_task(config), config)


def test_fid_evaluator_compares_heldout_outputs_in_a_clip_space(tmp_path, monkeypatch):
  """source='heldout' (an autoencoder's reconstructions of the eval images) on features='clip' (a contrastive run's
  unit image embeddings): an untrained autoencoder's reconstructions are far from the images; reconstructions equal
  to the images are at KID 0 with precision and recall 1, which a misaligned real/fake pair or features would miss."""
  from configs.mnist_vae import get_config
  from diffusion_jax.config import ConfigError
  from diffusion_jax.defaults import evaluator
  from diffusion_jax.tasks.autoencoder import AutoencoderTask
  from diffusion_jax.train.evaluators import make_evaluators
  from diffusion_jax.train.task import get_task
  from diffusion_jax.train.trainer import Trainer
  from tests.runs import clip_config, saved_run
  clip_dir = str(tmp_path / "clip")
  saved_run(clip_config("tiny"), clip_dir)
  config = get_config("tiny")
  config.evals = {"fid": evaluator("fid", features="clip", clip_workdir=clip_dir, source="heldout", num_samples=48,
                                   frechet=False, precision_recall=True, batch_size=16)}
  config.sample.batch_size = 16
  saved_run(config, str(tmp_path / "vae"))
  trainer = Trainer(config, str(tmp_path / "vae"))
  untrained = trainer.evaluate()
  assert set(untrained) >= {"eval/fid_clip_kid", "eval/fid_clip_precision"} and "eval/fid_clip" not in untrained
  monkeypatch.setattr(AutoencoderTask, "heldout_outputs", lambda self, ctx, images, seed: np.asarray(images))
  same = Trainer(config, str(tmp_path / "vae")).evaluate()
  assert same["eval/fid_clip_precision"] == same["eval/fid_clip_recall"] == 1.0
  assert abs(same["eval/fid_clip_kid"]) < untrained["eval/fid_clip_kid"] / 10
  assert untrained["eval/fid_clip_kid"] > 0
  # A Fréchet distance on more CLIP dimensions than images is refused before any sampling; a switched-off entry
  # needs no CLIP run; 'samples' needs class names to prompt with.
  config.evals.fid.update(frechet=True, num_samples=8)
  with pytest.raises(ConfigError, match="8 samples give a singular .* covariance of CLIP features"):
    make_evaluators(get_task(config), config)
  config.evals.fid.update(every=-1, clip_workdir="")
  make_evaluators(get_task(config), config)
  config.evals.fid.update(every=0)
  with pytest.raises(ConfigError, match="features='clip' needs clip_workdir"):
    make_evaluators(get_task(config), config)
  config.evals.fid.update(source="samples", features="digits")
  with pytest.raises(ConfigError, match="does not generate images from class names"):
    make_evaluators(get_task(config), config)


def test_paired_kid_keeps_an_image_away_from_its_own_reconstruction():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(120, 8)) * 3
  copy = real + 0.01 * rng.normal(size=real.shape)  # near-perfect reconstructions, row for row
  unpaired, unpaired_spread = fid.kid(real, copy, subset_size=60, num_subsets=50)
  paired, spread = fid.kid(real, copy, subset_size=60, num_subsets=50, paired=True)
  # Unpaired subsets meet their own rows (about half of them here), which pulls MMD² below zero; disjoint rows
  # leave an estimate centred on zero.
  assert unpaired < -2 * unpaired_spread and abs(paired) < spread
  shifted, _ = fid.kid(real, copy + 2.0, subset_size=60, num_subsets=50, paired=True)
  assert shifted > 10 * spread
  with pytest.raises(ValueError, match="paired KID needs as many"):
    fid.kid(real, copy[:50], paired=True)
