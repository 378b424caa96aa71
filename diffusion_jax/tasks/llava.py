"""Image-to-text on the shared trainer: LLaVA's recipe as three stages of one task (`llava.stage`).

  0  the language model alone, on the conversations' text (optional: for a language model trained from scratch)
  1  the projector alone, on captions; vision tower and language model frozen (LLaVA's feature-alignment stage)
  2  projector and language model, on instructions; the vision tower frozen unless `llava.train_vision`

Weights come from earlier runs or pretrained folders: `llava.vision_from` (a contrastive run's image tower, or a
transformers CLIP/SigLIP folder), `llava.lm_from` (a stage-0 run, or a Llama/Qwen2 folder), `llava.projector_from`
(a stage-1 run; stage 2 then takes that run's vision and language sources unless given). Frozen parts are read at
every start and recorded (train.runs); trainable ones start from their source only when a run starts from scratch.

Rows come from `data.conversations` (`data.instructions`: 'captions', 'digit_vqa') or from LLaVA-format files
(`data.source='conversations'`); the loss is the next-token cross-entropy on the assistant's tokens only.
"""
from __future__ import annotations

import base64
import io
import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.autoregressive.sampler import Sampler, SamplingConfig
from diffusion_jax.config import ConfigError
from diffusion_jax.data import conversations, instructions, pipeline, tokenizers
from diffusion_jax.data.conversations import ChatFormat, ChatTokens
from diffusion_jax.data.hf_tokenizer import HFTokenizer
from diffusion_jax.models.decoder import DecoderConfig
from diffusion_jax.models.llava import LlavaConfig, LlavaModel
from diffusion_jax.models.vit import CLIPVisionConfig
from diffusion_jax.pipelines.image_to_text import generate_answers
from diffusion_jax.models.clip import clip_pixels
from diffusion_jax.train import parts, runs
from diffusion_jax.train.task import ModelContext, Task, register

STAGES = (0, 1, 2)
TRAINED = {0: ("language_model",), 1: ("projector",), 2: ("projector", "language_model")}


@register("llava")
class LlavaTask(Task):

  def __init__(self, config):
    super().__init__(config)
    v = config.llava
    if int(v.stage) not in STAGES:
      raise ConfigError(f"llava.stage must be one of {STAGES}, got {v.stage!r}")
    self.stage = int(v.stage)
    if config.model.pixel_normalization not in ("none", "clip"):
      raise ConfigError(f"model.pixel_normalization must be 'none' or 'clip', got {config.model.pixel_normalization!r}")
    self.tokenizer = tokenizers.get_tokenizer(config.data.tokenizer)
    if not isinstance(self.tokenizer, HFTokenizer):
      raise ConfigError(f"data.tokenizer={config.data.tokenizer!r}: a vision–language model needs a transformers "
                        "tokenizer folder (tokenizer.json with its special tokens), e.g. 'mnist_chat'")
    try:
      self.tokens = ChatTokens.of(self.tokenizer)
    except ValueError as e:
      raise ConfigError(f"data.tokenizer={config.data.tokenizer!r}: {e}") from None
    self.fmt = ChatFormat()
    self.projector_run = runs.RunSource("llava.projector_from", v.projector_from, task="llava",
                                        select=("projector",)) if v.projector_from else None
    earlier = self.projector_run.config().llava if self.projector_run is not None else None
    self.vision_source, vision = self._vision_source(v.vision_from or (earlier.vision_from if earlier else ""))
    self.lm_source, text = self._lm_source(v.lm_from or (earlier.lm_from if earlier else ""))
    if self.stage >= 1 and self.vision_source is None:
      raise ConfigError(f"llava.stage={self.stage} trains on a pretrained vision tower: set llava.vision_from to a "
                        "contrastive run or a CLIP/SigLIP folder")
    if self.stage >= 1 and self.lm_source is None:
      raise ConfigError(f"llava.stage={self.stage} needs a language model: set llava.lm_from to a stage-0 run or a "
                        "Llama/Qwen2 folder")
    if text.vocab_size < self.tokenizer.vocab_size:
      raise ConfigError(f"the language model's vocabulary ({text.vocab_size}) is smaller than the tokenizer's "
                        f"({self.tokenizer.vocab_size})")
    self.model_config = LlavaConfig(vision=vision, text=text, image_token_id=self.tokens.image_id,
                                    projector=v.projector, feature_layer=int(v.feature_layer),
                                    feature_select=v.feature_select)
    d = config.data
    self.max_len = int(d.max_text_len)
    if self.model_config.num_image_tokens + 4 > self.max_len:
      raise ConfigError(f"data.max_text_len={self.max_len} leaves no room for text after the "
                        f"{self.model_config.num_image_tokens} image tokens")
    if d.conversations and d.conversations not in instructions.KINDS:
      raise ConfigError(f"data.conversations={d.conversations!r} is not one of {instructions.KINDS} (or '' for "
                        "records that carry their conversations)")

  # ------------------------------------------------------------------ parts and their sources
  def _vision_source(self, path: str) -> tuple[Optional[runs.Source], CLIPVisionConfig]:
    frozen = not self.config.llava.train_vision
    if not path:
      m, d = self.config.model, self.config.data
      return None, CLIPVisionConfig(image_size=d.image_size, patch_size=m.patch_size, channels=d.channels,
                                    width=m.vision_width, layers=m.vision_layers, heads=m.vision_heads,
                                    mlp_dim=m.vision_width * 4, act="gelu", pooling="cls")
    if os.path.isdir(os.path.join(path, "checkpoints")):
      source = runs.RunSource("llava.vision_from", path, task="contrastive", select=("vision_model",), frozen=frozen)
      return source, source.task().model_config.vision
    from diffusion_jax import pretrained
    from diffusion_jax.models.vit import CLIPVisionModel
    module = runs.ModuleSource("llava.vision_from", path, lambda p: pretrained.load(p)).module()
    if isinstance(module, CLIPVisionModel):  # a bare tower: its names go under ours
      tower, placement = module, dict(target="vision_model")
    elif isinstance(getattr(module, "vision_model", None), CLIPVisionModel):  # CLIP/SigLIP/LLaVA: take its tower
      tower, placement = module.vision_model, dict(select=("vision_model",))
    else:
      raise ConfigError(f"llava.vision_from={path!r} holds a {type(module).__name__}, not a vision tower")
    # The folder was read once, above; the source hands out that module.
    return runs.ModuleSource("llava.vision_from", path, lambda _: module, frozen=frozen, **placement), tower.config

  def _lm_source(self, path: str) -> tuple[Optional[runs.Source], DecoderConfig]:
    frozen = self.stage == 1
    if not path:
      m = self.config.model
      return None, DecoderConfig(
          vocab_size=self.tokenizer.vocab_size, width=m.lm_width, layers=m.lm_layers, heads=m.lm_heads,
          kv_heads=m.lm_kv_heads or None, mlp_dim=m.lm_mlp_dim, act="silu", gated_mlp=True, norm="rms",
          norm_eps=1e-6, positions="rope", qkv_bias=False, out_bias=False, tie_embeddings=bool(m.tie_embeddings))
    if os.path.isdir(os.path.join(path, "checkpoints")):
      source = runs.RunSource("llava.lm_from", path, task="llava", select=("language_model",), frozen=frozen)
      return source, source.task().model_config.text
    from diffusion_jax import pretrained
    from diffusion_jax.models.decoder import DecoderLM
    loaded = runs.ModuleSource("llava.lm_from", path, lambda p: pretrained.load(p), frozen=frozen,
                               target="language_model", expect=DecoderLM)
    return loaded, loaded.module().config

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    return LlavaModel(self.model_config, rngs=rngs)

  def frozen(self):
    trained = TRAINED[self.stage] + (("vision_model",) if self.config.llava.train_vision else ())
    return parts.under(*[p for p in ("vision_model", "projector", "language_model") if p not in trained])

  def weight_sources(self):
    return [s for s in (self.vision_source, self.lm_source, self.projector_run) if s is not None]

  # ------------------------------------------------------------------ data
  def data_examples(self, ds, data_cfg, training: bool, seed: int):
    if data_cfg.conversations:
      make = instructions.MakeConversation(data_cfg.conversations, data_cfg.caption_templates, data_cfg.class_names)
      ds = ds.random_map(make, seed=pipeline.derived_seed(seed, "conversation"))
    return ds.map(conversations.TokenizeConversation(
        self.tokens, self.fmt, max_len=self.max_len, num_image_tokens=self.model_config.num_image_tokens,
        image_shape=(data_cfg.image_size, data_cfg.image_size, data_cfg.channels)))

  def pixels(self, images: jax.Array) -> jax.Array:
    """Pipeline images in [-1, 1] as the vision tower expects them."""
    return clip_pixels(images, self.config.model.pixel_normalization)

  # ------------------------------------------------------------------ training
  def token_losses(self, model: LlavaModel, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token cross-entropy [B, L-1], the weights of the tokens that count, and whether argmax was right."""
    tokens = batch["tokens"]
    if self.stage == 0:
      # The language model alone, on every text token: the image's placeholder ids stay as they are.
      logits = model.language_model(tokens)
      weight = (tokens[:, 1:] != self.tokens.pad_id) & (tokens[:, 1:] != self.tokens.image_id)
      weight = weight.astype(jnp.float32)
    else:
      logits = model(tokens, self.pixels(batch["image"]))
      weight = batch["loss_mask"][:, 1:]
    weight = weight * batch["valid"][:, None]
    logits = logits[:, :-1]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == tokens[:, 1:]).astype(jnp.float32)
    return nll, weight, correct

  def loss(self, model, batch, rng):
    del rng
    nll, weight, correct = self.token_losses(model, batch)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    loss = jnp.sum(nll * weight) / count
    return loss, {"token_accuracy": jnp.sum(correct * weight) / count, "count/tokens": jnp.sum(weight),
                  "count/skipped_examples": jnp.sum(1.0 - batch["valid"])}

  # ------------------------------------------------------------------ answering
  def prompt_ids(self, question: str) -> list[int]:
    """The ids of a user turn holding the image and `question`, ending at the assistant's cue."""
    ids, _, _ = conversations.tokenize_conversation(
        instructions.conversation(question, "")[:1], self.tokens, self.fmt, max_len=self.max_len * 4,
        num_image_tokens=self.model_config.num_image_tokens)
    return [int(t) for t in ids if t != self.tokens.pad_id]

  def answer(self, ctx: ModelContext, images: np.ndarray, questions: Sequence[str], *, batch_size: int = 256,
             max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Answers to one question per image (images [N, H, W, C] in [-1, 1]), in fixed-size chunks: one compile."""
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop_tokens=(self.tokens.eos_id,), pad_id=self.tokens.pad_id)
    pixels = np.asarray(self.pixels(jnp.asarray(images, jnp.float32)))
    answers = generate_answers(Sampler(ctx.merge()), [self.prompt_ids(q) for q in questions], pixels, config,
                               batch_size=batch_size, seed=seed, mesh=ctx.mesh)
    return [self.tokenizer.decode([t for t in row if t != self.tokens.eos_id]).strip() for row in answers]

  def sample(self, ctx: ModelContext, out_dir: str) -> dict[str, Any]:
    """Answers `sample.question` about `sample.images` (files; default: the first `sample.count` images of the
    eval split) into captions.jsonl, and a contact sheet (contact_sheet.html) of each image beside its answer."""
    s = self.config.sample
    images, names = self._sample_images(s)
    answers = self.answer(ctx, images, [s.question] * len(images), batch_size=len(images),
                          max_new_tokens=int(s.max_new_tokens), temperature=float(s.temperature),
                          top_p=float(s.top_p), seed=int(self.config.seed))
    if not ctx.is_main_process:
      return {}
    with open(os.path.join(out_dir, "captions.jsonl"), "w") as f:
      for name, answer in zip(names, answers):
        f.write(json.dumps({"image": name, "question": s.question, "answer": answer}) + "\n")
    _contact_sheet(os.path.join(out_dir, "contact_sheet.html"), images, names, s.question, answers)
    return {"captions": os.path.join(out_dir, "captions.jsonl"), "answers": answers}

  def _sample_images(self, s) -> tuple[np.ndarray, list[str]]:
    d = self.config.data
    if s.images:
      from diffusion_jax.data import transforms
      decode, fit = transforms.DecodeImage(d.channels), transforms.FitImage(d.image_size)
      images = []
      for path in s.images:
        try:
          with open(path, "rb") as f:
            element = fit.map(decode.map({"image": f.read()}))
        except OSError as e:
          raise ConfigError(f"sample.images: cannot read {path}: {e.strerror}") from None
        if element["image"] is None:
          raise ConfigError(f"sample.images: {path} is not an image")
        images.append(element["image"].astype(np.float32) / 127.5 - 1.0)
      return np.stack(images), list(s.images)
    # Every process takes the same first images of the eval split.
    batch = next(iter(pipeline.make_dataset(d, d.eval_split, global_batch_size=int(s.count), seed=0, shuffle=False,
                                            repeat=False, drop_remainder=False, examples=self.data_examples)))
    return np.asarray(batch["image"]), [f"{d.eval_split}[{i}]" for i in range(int(s.count))]


def _contact_sheet(path: str, images: np.ndarray, names: Sequence[str], question: str, answers: Sequence[str]):
  """An HTML page: each image (PNG, inline) beside the question and the model's answer."""
  from html import escape

  from PIL import Image
  rows = []
  for image, name, answer in zip(images, names, answers):
    pixels = np.clip((np.asarray(image) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).resize(
        (96, 96), Image.Resampling.NEAREST).save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    rows.append(f"<tr><td><img src='data:image/png;base64,{data}'></td><td>{escape(name)}</td>"
                f"<td>{escape(question)}</td><td><b>{escape(answer)}</b></td></tr>")
  with open(path, "w", encoding="utf-8") as f:
    f.write("<html><body><table border=1 cellpadding=4><tr><th>image</th><th>file</th><th>question</th>"
            "<th>answer</th></tr>" + "".join(rows) + "</table></body></html>")
