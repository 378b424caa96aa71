"""Finished runs for tests that only consume them: a checkpoint of a config's random initialisation, written like a
run's (with its config), without compiling a train step."""
from configs.mnist_clip import get_config as clip_config
from diffusion_jax.train.trainer import Trainer


def saved_run(config, workdir: str) -> Trainer:
  """The trainer of a 'finished run' at step 0 in `workdir`; `trainer.load_for_inference()` reads it back."""
  trainer = Trainer(config, workdir)
  ckpt = trainer.checkpointer()
  ckpt.save(0, trainer.init_state(), data_state=None, config_json=config.to_json_best_effort(), wait=True)
  ckpt.close()
  return trainer


def unclip_clip_run(workdir: str) -> Trainer:
  """The tiny CLIP run of an unCLIP chain (its training is tested in test_contrastive_task)."""
  c = clip_config("tiny")
  c.model.embed_dim = c.model.text_width  # unCLIP's prior and projection take token states as wide as embeddings
  return saved_run(c, workdir)
