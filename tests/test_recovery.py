"""What the trainer does when a run goes wrong: non-finite state, a checkpoint of another model, an unreadable
newest checkpoint, unreadable data, a finished run started again, Ctrl-C."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax.data import records
from diffusion_jax.data.records import DataError
from diffusion_jax.train.checkpointing import Checkpointer, CheckpointMismatch
from diffusion_jax.train.metrics_writer import read_metrics
from diffusion_jax.train.trainer import FINISHED_FILE, NonFiniteError, Trainer
from tests.toy_task import toy_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = {"mesh.shape": (1, 1, 1)}


def _finite(state) -> bool:
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((state.params, state.opt_state, state.ema))
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
  """A learning rate of 1e30 without clipping: the parameters overflow while the step's loss (computed before the
  update) is still finite. The run stops at that step, naming it and the last good checkpoint, which restores
  finite."""
  config = toy_config(**ONE, **{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.schedule": "constant",
                                "optim.grad_clip": 0.0, "train.steps": 20, "train.checkpoint_every": 1,
                                "ema.enabled": False})
  with pytest.raises(NonFiniteError, match=r"at step (\d+); stopping without saving it\. Last good checkpoint: "
                                           r"(step \d+|none)") as info:
    Trainer(config, str(tmp_path)).train()
  bad = int(info.value.args[0].split(" at step ")[1].split(";")[0])
  ckpt = Checkpointer(os.path.join(str(tmp_path), "checkpoints"))
  steps = ckpt.all_steps()
  assert all(s < bad for s in steps), (steps, bad)
  trainer = Trainer(config, str(tmp_path))
  if steps:
    state, _ = ckpt.restore(steps[-1], trainer.abstract_state)
    assert _finite(state)
  losses = [r["train/loss"] for r in read_metrics(str(tmp_path)) if "train/loss" in r]
  assert all(np.isfinite(losses)), losses


def test_a_non_finite_run_through_the_cli_is_one_line_and_exit_code_1(tmp_path):
  from tests.test_cli import run_cli
  config = tmp_path / "toy.py"  # the toy task of the test above, as a config file for the CLI
  config.write_text("from tests.toy_task import toy_config\n\n\ndef get_config(arg=None):\n  return toy_config()\n")
  proc = run_cli("--config", str(config), "--workdir", str(tmp_path / "run"), "--config.optim.lr=1e30",
                 "--config.optim.grad_clip=0", "--config.optim.warmup_steps=0", "--config.optim.schedule=constant",
                 "--config.train.steps=50")
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Last good checkpoint" in lines[0] and "Traceback" not in proc.stderr


def test_resuming_with_another_model_names_the_parameters(tmp_path):
  Trainer(toy_config(**ONE, **{"train.steps": 3}), str(tmp_path)).train()
  changed = toy_config(**ONE, **{"train.steps": 6, "data.image_size": 6})
  with pytest.raises(CheckpointMismatch, match=r"params\.main\.fc1\.kernel: stored \(64, 32\), requested \(36, 32\)"
                                               r".*belongs to another config"):
    Trainer(changed, str(tmp_path)).train()


def _truncate(path):
  with open(path, "r+b") as fh:
    fh.truncate(os.path.getsize(path) // 2)


def _scribble(path):
  with open(path, "wb") as fh:
    fh.write(b"{\x00 not what was written")


# What a full disk, a killed copy or a bad sync leaves: array data cut short, or the metadata that describes it.
# (A scribbled step-level _CHECKPOINT_METADATA is not here: Orbax logs it and restores the step regardless.)
CORRUPTIONS = {
    "truncated array data": ("params/**/d/*", _truncate),
    "garbage tree metadata": ("params/_METADATA", _scribble),
    "garbage saved config": ("config/metadata", _scribble),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_an_unreadable_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path, kind):
  wd = str(tmp_path)
  Trainer(toy_config(**ONE), wd).train()  # checkpoints at steps 3 and 6
  pattern, corrupt = CORRUPTIONS[kind]
  files = [f for f in glob.glob(os.path.join(wd, "checkpoints", "6", pattern), recursive=True)
           if os.path.isfile(f) and os.path.getsize(f) > 0]
  assert files
  for f in files:
    corrupt(f)
  resumed = Trainer(toy_config(**ONE, **{"train.steps": 8}), wd).train()
  assert int(resumed.step) == 8
  aside = glob.glob(os.path.join(wd, "checkpoints", "6.unreadable-*"))
  assert len(aside) == 1 and os.path.isdir(aside[0])  # kept for inspection, never deleted
  assert Checkpointer(os.path.join(wd, "checkpoints")).all_steps() == [3, 6, 8]
  assert sorted(r["step"] for r in read_metrics(wd) if "train/loss" in r) == list(range(1, 9))


def test_a_dataset_of_unreadable_examples_stops_the_run_in_one_line(tmp_path):
  path = str(tmp_path / "bad.array_record")
  records.write_array_record(path, [b"\x00not msgpack"] * 40)
  config = toy_config(**ONE, **{"data.source": "array_record", "data.path": path})
  with pytest.raises(DataError, match="every one of the 16 examples of the batch for step 1 was unreadable"):
    Trainer(config, str(tmp_path / "run")).train()
  assert Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == []


def test_mostly_unreadable_data_stops_after_the_first_steps(tmp_path):
  path = str(tmp_path / "mixed.array_record")
  good = records.encode_record(np.full((8, 8), 200, np.uint8), "", 3)
  records.write_array_record(path, [good if i % 4 == 0 else b"\x00bad" for i in range(64)])
  config = toy_config(**ONE, **{"data.source": "array_record", "data.path": path, "train.steps": 12})
  with pytest.raises(DataError, match=r"of the first 160 training examples were unreadable.*max_unreadable_fraction"):
    Trainer(config, str(tmp_path / "run")).train()


def test_a_finished_run_started_again_runs_only_the_end_of_run_work_it_missed(tmp_path):
  wd = str(tmp_path)
  Trainer(toy_config(**ONE, **{"train.eval_at_end": False}), wd).train()
  assert not [r for r in read_metrics(wd) if "eval/param_norm" in r]
  state = Trainer(toy_config(**ONE), wd).train()  # nothing to train; the end-of-run evaluation never ran
  assert int(state.step) == 6
  evals = [r for r in read_metrics(wd) if "eval/param_norm" in r]
  assert [r["step"] for r in evals] == [6]
  with open(os.path.join(wd, FINISHED_FILE)) as f:
    assert json.load(f) == {"step": 6, "sampled": True, "evaluated": True}
  Trainer(toy_config(**ONE), wd).train()  # and a third time: nothing at all
  assert len([r for r in read_metrics(wd) if "eval/param_norm" in r]) == 1


_SIGINT_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
import tests.conftest
from diffusion_jax.train.trainer import Trainer
from tests.toy_task import toy_config
Trainer(toy_config(**{{"train.steps": 100000, "train.checkpoint_every": 100000, "mesh.shape": (1, 1, 1),
                     "train.log_every": 1}}), {workdir!r}).train()
print("returned cleanly")
"""


def _start_and_wait_for_steps(workdir):
  proc = subprocess.Popen([sys.executable, "-c", _SIGINT_SCRIPT.format(repo=REPO, workdir=workdir)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  deadline = time.time() + 240
  while time.time() < deadline and len(read_metrics(workdir)) < 3:
    time.sleep(0.2)
  return proc


def test_ctrl_c_saves_a_checkpoint_and_a_second_one_exits_at_once(tmp_path):
  first = str(tmp_path / "once")
  proc = _start_and_wait_for_steps(first)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "returned cleanly" in out, err[-2000:]
  assert "SIGINT received" in err and "Traceback" not in err
  latest = Checkpointer(os.path.join(first, "checkpoints")).latest_step()
  assert latest is not None and latest >= 3

  second = str(tmp_path / "twice")
  proc = _start_and_wait_for_steps(second)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 130 and "returned cleanly" not in out, err[-2000:]
  assert "second SIGINT" in err
