"""MAE pre-training and ViT classification on the trainer: the masking and patch order against their definitions, a
tiny MNIST MAE run whose reconstructions are measured and written, a classifier fine-tuned from it (weights carried
over by name, fixed positions becoming learned ones) and a linear probe whose tower stays frozen; layer-wise
learning-rate decay, mixup/cutmix and stochastic depth against their formulas; TFDS-style split slices."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.mnist_mae import get_config as mae_config
from configs.mnist_vit import get_config as vit_config
from diffusion_jax.config import ConfigError
from diffusion_jax.data.records import DataError
from diffusion_jax.data.sources import make_source
from diffusion_jax.models.mae import MAE, patchify, shuffle, unpatchify
from diffusion_jax.models.transformer import residual_keep
from diffusion_jax.models.vit import CLIPVisionConfig, CLIPVisionModel, FixedPositions
from diffusion_jax.tasks.classify import mix
from diffusion_jax.tasks.mae import mae_config as build_mae_config
from diffusion_jax.train import parts
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.optimizer import layer_decay, layer_depth
from diffusion_jax.train.trainer import Trainer


def test_masking_keeps_the_lowest_noise_patches_and_patch_order_round_trips():
  noise = jnp.asarray([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
  kept, mask, restore = shuffle(noise, 1)
  np.testing.assert_array_equal(kept, [[1], [0]])
  np.testing.assert_array_equal(mask, [[1, 0, 1, 1], [0, 1, 1, 1]])
  np.testing.assert_array_equal(jnp.take_along_axis(jnp.argsort(noise, axis=1), restore, axis=1), [[0, 1, 2, 3]] * 2)
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  patches = patchify(images, 2)
  # Patch 1 is the top-right 2×2 block, its pixels row by row with channels last.
  np.testing.assert_array_equal(patches[0, 1], images[0, 0:2, 2:4].reshape(-1))
  np.testing.assert_array_equal(unpatchify(patches, 2, 3), images)


def _tiny_mae():
  return MAE(build_mae_config(mae_config("tiny")), rngs=nnx.Rngs(0))


def test_reconstruction_keeps_visible_patches_and_positions_are_not_parameters():
  mae = _tiny_mae()
  images = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1), minval=-1, maxval=1)
  noise = jax.random.uniform(jax.random.key(1), (2, 16))
  loss, pred, mask = nnx.jit(lambda m, x, n: m(x, noise=n))(mae, images, noise)
  assert pred.shape == (2, 16, 49) and float(mask.sum()) == 2 * 12 and np.isfinite(float(loss))
  rec = patchify(mae.reconstruct(images, pred, mask), 7)
  visible = np.asarray(mask) == 0
  np.testing.assert_array_equal(np.asarray(rec)[visible], np.asarray(patchify(images, 7))[visible])
  np.testing.assert_allclose(np.asarray(rec)[~visible], np.asarray(pred)[~visible], rtol=1e-6)
  assert isinstance(mae.vision_model.position_embedding, FixedPositions)
  names = parts.flat_names(nnx.state(mae, nnx.Param))
  assert "mask_token" in names and not [k for k in names if "position_embedding" in k or "pos_embed" in k]


def test_layer_decay_scales_updates_by_depth():
  names = ["vision_model.patch_embedding.kernel", "vision_model.layers.0.attn.kernel",
           "vision_model.layers.1.mlp.kernel", "vision_model.post_layernorm.scale", "classifier.kernel"]
  assert [layer_depth(n) for n in names] == [0, 1, 2, None, None]
  assert layer_depth("decoder_layers.0.attn.kernel") is None  # MAE's decoder blocks are not tower layers
  updates = {n: jnp.ones(()) for n in names}
  tx = layer_decay(0.5)
  scaled, _ = tx.update(updates, tx.init(updates))
  assert [float(scaled[n]) for n in names] == [0.125, 0.25, 0.5, 1.0, 1.0]


def test_mixup_and_cutmix_weigh_targets_by_what_they_mixed():
  images = jnp.stack([jnp.zeros((8, 8, 1)), jnp.ones((8, 8, 1))])
  targets = jnp.eye(2)
  for seed in range(4):
    mixed, t = mix(images, targets, jax.random.key(seed), 0.0, 1.0)  # CutMix: a box of the other image
    share = float(jnp.mean(mixed[0]))  # image 0 is zeros: its mean is the share pasted from image 1
    np.testing.assert_allclose(t[0], [1 - share, share], atol=1e-6)
    mixed, t = mix(images, targets, jax.random.key(seed), 0.8, 0.0)  # Mixup: a blend
    np.testing.assert_allclose(float(mixed[0, 0, 0, 0]), float(t[0, 1]), atol=1e-6)
    np.testing.assert_allclose(t.sum(axis=1), [1.0, 1.0], atol=1e-6)


def test_stochastic_depth_keeps_the_expected_output_and_is_off_without_an_rng():
  x = jnp.ones((4000, 3, 2))
  keep_attn, keep_mlp = residual_keep(jax.random.key(0), 0.25, x)
  for keep in (keep_attn, keep_mlp):
    np.testing.assert_allclose(np.unique(np.asarray(keep)), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs(float(keep.mean()) - 1.0) < 0.05
  assert residual_keep(None, 0.25, x) == (1.0, 1.0)
  tower = CLIPVisionModel(CLIPVisionConfig(image_size=8, patch_size=4, channels=1, width=8, layers=3, heads=2,
                                           mlp_dim=16, drop_path=0.5), rngs=nnx.Rngs(0))
  pixels = jnp.ones((2, 8, 8, 1))
  a, b = tower(pixels)[1], tower(pixels, rng=jax.random.key(1))[1]
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, tower(pixels)[1])


def test_split_expressions_slice_and_join_like_tfds():
  d = mae_config("tiny").data
  train, validation = make_source(d, "train"), make_source(d, "validation")
  view = make_source(d, "train[:600]")
  assert len(view) == 600 and view[599]["label"] == train[599]["label"]
  joined = make_source(d, "train+validation[-10:]")
  assert len(joined) == len(train) + 10
  np.testing.assert_array_equal(joined[len(train) + 9]["image"], validation[len(validation) - 1]["image"])
  assert len(make_source(d, "train[:1%]")) == len(train) // 100
  with pytest.raises(DataError, match="cannot read split"):
    make_source(d, "train[::2]")
  with pytest.raises(DataError, match="is empty"):
    make_source(d, "train[5:3]")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mae"))
  trainer = Trainer(mae_config("tiny"), workdir)
  trainer.train()
  return workdir, trainer


def test_tiny_mae_run_measures_masked_psnr_and_writes_triples(mae_run):
  workdir, _ = mae_run
  evals = [r for r in read_metrics(workdir) if "eval/masked_psnr" in r]
  assert evals and all(np.isfinite(evals[-1][k]) for k in ("eval/masked_psnr", "eval/psnr", "eval/loss"))
  assert evals[-1]["eval/examples"] == 64
  folder = os.path.join(workdir, "samples", "step_3")
  with open(os.path.join(folder, "index.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["prompt"] for r in rows[:3]] == ["original", "masked", "reconstruction"] and len(rows) == 12
  assert os.path.exists(os.path.join(folder, "grid.png"))


def _tower(state_or_trainer, prefix):
  return {k: np.asarray(v) for k, v in parts.flat_names(state_or_trainer).items() if k.startswith(prefix)}


def test_fine_tuning_starts_from_the_mae_tower_and_a_probe_keeps_it_frozen(mae_run, tmp_path):
  mae_dir, mae_trainer = mae_run
  mae_state, _ = mae_trainer.restore_or_init(mae_trainer.checkpointer(create=False), init=False)
  mae_weights = {**_tower(mae_state.params["main"], "vision_model"), **_tower(mae_state.mutable, "vision_model")}
  assert "vision_model.position_embedding" in mae_weights  # a fixed table: mutable state of the MAE run

  c = vit_config("finetune,tiny")
  c.classify.init_from = mae_dir
  ft = Trainer(c, str(tmp_path / "ft"))
  state, _ = ft.restore_or_init(ft.checkpointer())
  got = _tower(state.params["main"], "vision_model")
  assert sorted(got) == sorted(mae_weights)  # the learned position embedding starts from MAE's table
  for k, v in mae_weights.items():
    np.testing.assert_array_equal(got[k], v)
  ft.train()
  assert [r for r in read_metrics(str(tmp_path / "ft")) if "eval/accuracy" in r]

  c = vit_config("probe,tiny")
  c.classify.init_from = mae_dir
  probe = Trainer(c, str(tmp_path / "probe"))
  state = probe.train()
  assert not _tower(state.params["main"], "vision_model")  # the tower is frozen: not trained, not checkpointed
  frozen = _tower(probe.frozen, "vision_model")
  for k, v in mae_weights.items():
    np.testing.assert_array_equal(frozen[k], v)
  stats = parts.flat_names(state.mutable)
  assert any("probe_norm.mean" in k for k in stats)
  assert not np.allclose(np.asarray(stats["probe_norm.mean"]), 0.0)  # the BatchNorm saw training features
  final = [r for r in read_metrics(str(tmp_path / "probe")) if "eval/accuracy" in r][-1]
  assert 0.0 <= final["eval/accuracy"] <= 1.0 and final["eval/examples"] == 128


def test_accuracy_evaluator_matches_the_argmax_of_the_models_logits_and_the_classifier_exports(tmp_path):
  c = vit_config("tiny")
  c.model.pooling = "cls"  # transformers' ViTForImageClassification reads the class token
  trainer = Trainer(c, str(tmp_path))
  state = trainer.train()
  ctx = trainer.model_context(state)
  from diffusion_jax.train.evaluators import split_outputs
  fn = ctx.jit(lambda model, x: model(x))
  got = split_outputs(ctx, c.data, c.data.eval_split, 64, lambda b: {"logits": fn(b["image"]), "label": b["label"]},
                      max_examples=128)
  want = float(np.mean(np.argmax(got["logits"], axis=1) == got["label"]))
  final = [r for r in read_metrics(str(tmp_path)) if "eval/accuracy" in r][-1]
  assert final["eval/accuracy"] == pytest.approx(want)
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(got["logits"])), got["label"][:, None], axis=1).mean()
  assert final["eval/nll"] == pytest.approx(float(nll), rel=1e-5)
  # The trained classifier is transformers' layout: exported, transformers gives the same logits.
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from diffusion_jax.pretrained.vit import save_transformers
  model = ctx.merge()
  save_transformers(model, str(tmp_path / "export"))
  ref = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "export")).eval()
  pixels = np.asarray(split_outputs(ctx, c.data, c.data.eval_split, 64, lambda b: {"x": b["image"]},
                                    max_examples=8)["x"])
  with torch.no_grad():
    want = ref(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(pixels)), want, rtol=1e-4, atol=1e-5)
  c.model.pooling = "mean"
  with pytest.raises(ValueError, match="has no mean pooling"):
    save_transformers(Trainer(c, str(tmp_path / "mean")).task.build_model(nnx.Rngs(0)), str(tmp_path / "x"))


def test_classifier_fine_tunes_from_a_clip_run(tmp_path):
  from tests.runs import saved_run
  from configs.mnist_clip import get_config as clip_config
  clip = saved_run(clip_config("tiny"), str(tmp_path / "clip"))
  clip_state, _ = clip.restore_or_init(clip.checkpointer(create=False), init=False)
  want = _tower(clip_state.params["main"], "vision_model")
  c = vit_config("finetune,tiny")
  c.classify.init_from = str(tmp_path / "clip")
  ft = Trainer(c, str(tmp_path / "ft"))
  assert ft.task.tower.pre_norm  # CLIP's tower, with its pre-layernorm
  state, _ = ft.restore_or_init(ft.checkpointer())
  got = _tower(state.params["main"], "vision_model")
  assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_bad_classification_configs_are_one_line(tmp_path):
  c = vit_config("tiny")
  c.classify.init_from = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match="holds no checkpoints"):
    Trainer(c, str(tmp_path / "w"))
  c = vit_config("tiny")
  c.classify.label_smoothing = 1.0
  with pytest.raises(ConfigError, match="label_smoothing must be >= 0 and < 1"):
    Trainer(c, str(tmp_path / "w2"))
  c = vit_config("tiny")
  c.optim.layer_decay = 0.0
  with pytest.raises(ConfigError, match=r"layer_decay must be in \(0, 1\]"):
    Trainer(c, str(tmp_path / "w3"))
  c = mae_config("tiny")
  c.mae.mask_ratio = 1.0
  with pytest.raises(ConfigError, match="mask_ratio"):
    Trainer(c, str(tmp_path / "w4"))


def test_classifier_heads_pool_and_project_as_documented():
  from diffusion_jax.models.vit import ViTClassifier
  cfg = CLIPVisionConfig(image_size=8, patch_size=4, channels=1, width=8, layers=1, heads=2, mlp_dim=16,
                         pre_norm=False, patch_bias=True)
  pixels = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  clf = ViTClassifier(cfg, 5, pooling="mean", pre_logits=6, rngs=nnx.Rngs(0))
  tower = clf.vision_model
  _, x = tower.run_layers(tower.embed(pixels))
  pooled = tower.post_layernorm(jnp.mean(x[:, 1:], axis=1))  # the patch tokens' mean, the class token left out
  np.testing.assert_allclose(clf.features(pixels), pooled, rtol=1e-6)
  want = clf.classifier(jnp.tanh(clf.pre_logits(pooled)))
  np.testing.assert_allclose(clf(pixels), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="pooling 'mean' averages the patch tokens of a tower with a class token"):
    ViTClassifier(CLIPVisionConfig(image_size=8, patch_size=4, channels=1, width=8, layers=1, heads=2, mlp_dim=16,
                                   pooling="mean"), 5, pooling="mean", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("spec", ["mnist_mae:", "mnist_mae:tiny", "emoji_mae:", "emoji_mae:tiny", "mnist_vit:",
                                  "mnist_vit:tiny", "mnist_vit:finetune", "mnist_vit:probe,tiny"])
def test_shipped_mae_and_vit_configs_describe_buildable_models(spec):
  import importlib
  from diffusion_jax.models.tracing import abstract_model
  from diffusion_jax.train.task import get_task
  name, _, arg = spec.partition(":")
  task = get_task(importlib.import_module(f"configs.{name}").get_config(arg))
  abstract_model(lambda: task.build_model(nnx.Rngs(0)))  # shapes only: every size and patch fits its images
