"""Contrastive losses against a direct numpy transcription of the papers' pseudo-code, masking, sharding;
zero-shot and retrieval metrics on hand-made embeddings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax.contrastive import losses, zero_shot


def _np_normalize(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _np_log_softmax(z, axis):
  z = z - z.max(axis=axis, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _reference_clip(img, txt, scale):
  # CLIP paper, Figure 3: logits = scale * I_e @ T_e.T; loss = (CE(logits, arange, axis=0) + CE(axis=1)) / 2
  logits = scale * _np_normalize(img) @ _np_normalize(txt).T
  n = len(img)
  loss_i = -_np_log_softmax(logits, 1)[np.arange(n), np.arange(n)].mean()
  loss_t = -_np_log_softmax(logits, 0)[np.arange(n), np.arange(n)].mean()
  return (loss_i + loss_t) / 2


def _reference_siglip(img, txt, scale, bias):
  # SigLIP paper, Algorithm 1: labels = 2 * eye(n) - ones(n); l = -sum(log_sigmoid(labels * logits)) / n
  logits = scale * _np_normalize(img) @ _np_normalize(txt).T + bias
  labels = 2 * np.eye(len(img)) - 1
  return -np.sum(np.log(1 / (1 + np.exp(-labels * logits)))) / len(img)


@pytest.fixture
def embeddings():
  rng = np.random.default_rng(0)
  return rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)


def test_clip_loss_matches_the_paper(embeddings):
  img, txt = embeddings
  loss, metrics = losses.clip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(7.0))
  np.testing.assert_allclose(float(loss), _reference_clip(img.astype(np.float64), txt.astype(np.float64), 7.0),
                             rtol=1e-5)
  assert 0.0 <= float(metrics["batch_i2t_accuracy"]) <= 1.0


def test_siglip_loss_matches_the_paper(embeddings):
  img, txt = embeddings
  loss, _ = losses.siglip_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(10.0), jnp.float32(-10.0))
  np.testing.assert_allclose(float(loss), _reference_siglip(img.astype(np.float64), txt.astype(np.float64), 10.0,
                                                            -10.0), rtol=1e-5)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_invalid_rows_count_as_if_they_were_not_in_the_batch(embeddings, which):
  img, txt = embeddings
  valid = np.ones(16, np.float32)
  valid[[3, 11]] = 0
  keep = valid > 0
  # garbage in the invalid rows must not matter
  img_bad, txt_bad = img.copy(), txt.copy()
  img_bad[~keep], txt_bad[~keep] = 1e3, -1e3
  args = (jnp.float32(5.0),) if which == "clip" else (jnp.float32(5.0), jnp.float32(-3.0))
  fn = losses.clip_loss if which == "clip" else losses.siglip_loss
  masked, _ = fn(jnp.asarray(img_bad), jnp.asarray(txt_bad), *args, jnp.asarray(valid))
  dropped, _ = fn(jnp.asarray(img[keep]), jnp.asarray(txt[keep]), *args)
  np.testing.assert_allclose(float(masked), float(dropped), rtol=1e-5)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_loss_over_eight_devices_is_the_global_batch_loss(embeddings, which):
  img, txt = embeddings
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  rows = NamedSharding(mesh, P("data"))
  fn = losses.clip_loss if which == "clip" else losses.siglip_loss
  args = (jnp.float32(5.0),) if which == "clip" else (jnp.float32(5.0), jnp.float32(-3.0))
  loss_fn = jax.jit(lambda i, t: fn(i, t, *args)[0])
  sharded = loss_fn(jax.device_put(img, rows), jax.device_put(txt, rows))
  single = loss_fn(img, txt)
  # a per-device loss (each device contrasting only its own 2 rows) would be far smaller
  local = np.mean([float(loss_fn(img[i:i + 2], txt[i:i + 2])) for i in range(0, 16, 2)])
  np.testing.assert_allclose(float(sharded), float(single), rtol=1e-6)
  assert abs(float(single) - local) > 0.1


def test_zero_shot_averages_templates_and_scores_top_k():
  # 3 classes in 2-d; the two templates of each class point to either side of the class direction
  angles = np.array([0.0, 2.0, 4.0])
  prompt_emb = np.concatenate([[[np.cos(a - 0.3), np.sin(a - 0.3)], [np.cos(a + 0.3), np.sin(a + 0.3)]]
                               for a in angles])
  classes = zero_shot.class_embeddings(prompt_emb, 3)
  np.testing.assert_allclose(classes, np.stack([np.cos(angles), np.sin(angles)], 1), atol=1e-6)
  images = np.stack([np.cos(angles + 0.1), np.sin(angles + 0.1)], 1)
  acc = zero_shot.topk_accuracy(images, classes, np.array([0, 1, 1]), ks=(1, 2, 5))
  assert acc["top1"] == pytest.approx(2 / 3) and "top5" not in acc  # fewer than 5 classes: no top-5
  assert zero_shot.class_prompts(["cat", "dog"], ["a {name}", "the {name}"]) == ["a cat", "the cat", "a dog", "the dog"]


def test_retrieval_recall_with_shared_captions():
  text = np.eye(3, dtype=np.float32)  # three distinct captions
  # images 0,1 have caption 0; image 2 caption 1; image 3 caption 2 but looks more like caption 1
  images = np.array([[1, 0.1, 0], [0.9, 0, 0.2], [0.3, 1, 0], [0, 1, 0.2]], np.float32)
  r = zero_shot.retrieval_recall(images, text, np.array([0, 0, 1, 2]), ks=(1, 2))
  assert r["image_to_text_r1"] == pytest.approx(3 / 4) and r["image_to_text_r2"] == 1.0
  # caption 0 finds image 0; caption 1 finds image 3 before image 2; caption 2 finds image 1 before image 3
  assert r["text_to_image_r1"] == pytest.approx(1 / 3) and r["text_to_image_r2"] == 1.0
  unique, ids = zero_shot.dedupe_texts(np.array([[1, 5, 2], [1, 6, 2], [1, 5, 2]]))
  assert len(unique) == 2 and ids[0] == ids[2] != ids[1]
