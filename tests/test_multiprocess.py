"""Multi-controller JAX for real: 2 local processes × 4 CPU devices (gloo collectives over loopback), launched by
launch/local_multiprocess.sh through the real CLI, checkpoint, resume in a second launch, and log the same
per-step losses as one process with 8 devices and the same global batch.

The toy task adds noise drawn per batch row, so equal losses also mean every process fed its own rows of each
global batch in the right order; a constant learning rate makes "steps=3, then resume with steps=6" the same
schedule as one 6-step run.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import FAST_COMPILE
from diffusion_jax.train.metrics_writer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")
TIMEOUT_S = 300  # per launch; a hung collective fails the test instead of hanging CI

CONFIG = '''
"""tests/toy_task.py's config for the CLI, with a learning rate that does not depend on train.steps."""
from tests.toy_task import toy_config


def get_config(arg=None):
  return toy_config(**{"optim.schedule": "constant"})
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, PYTHON=sys.executable,
             # Cache every compiled program (the conftest cache directory is shared): the resumed launch and
             # reruns skip XLA.
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env["XLA_FLAGS"] = FAST_COMPILE
  env.update(extra)
  return env


class _Launch:
  """A command in its own process group, output to a file; `result()` waits, and on timeout kills the group."""

  def __init__(self, cmd, env, log_path):
    self.cmd, self.log_path = cmd, log_path
    self._log = open(log_path, "w")
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    self.start = time.monotonic()

  def result(self) -> str:
    try:
      self.proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - self.start)))
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGKILL)
      self.proc.wait()
      pytest.fail(f"timed out after {TIMEOUT_S}s (hung collective?): {' '.join(self.cmd)}\n{self._tail()}")
    finally:
      self._log.close()
    if self.proc.returncode != 0:
      pytest.fail(f"exit code {self.proc.returncode}: {' '.join(self.cmd)}\n{self._tail()}")
    with open(self.log_path) as f:
      return f.read()

  def _tail(self) -> str:
    with open(self.log_path) as f:
      return f.read()[-4000:]


def _cli(config, workdir, *overrides):
  return ["--config", config, "--workdir", workdir, *overrides]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  config = str(root / "toy_cli_config.py")
  with open(config, "w") as f:
    f.write(CONFIG)
  mp_dir, ref_dir, logs = str(root / "two_processes"), str(root / "one_process"), root / "logs"
  logs.mkdir()

  def two_processes(name, *overrides):
    env = _env(PORT=str(_free_port()), LOG_DIR=str(logs / name))
    return _Launch(["bash", LAUNCHER, "2", "4", *_cli(config, mp_dir, *overrides)], env, str(logs / f"{name}.log"))

  # The reference compiles other programs (one process, 8 devices): run it beside the first launch.
  reference = _Launch([sys.executable, "-m", "diffusion_jax.main", *_cli(config, ref_dir)],
                      _env(XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"), str(logs / "reference.log"))
  t0 = time.monotonic()
  first = two_processes("first", "--config.train.steps=3").result()
  second = two_processes("second").result()
  reference.result()
  print(f"\nlaunches took {time.monotonic() - t0:.0f}s")
  with open(logs / "second" / "process_1.log") as f:
    second_p1 = f.read()
  return dict(mp_dir=mp_dir, ref_dir=ref_dir, first=first, second=second, second_p1=second_p1)


def _rows(workdir, key):
  return [r for r in read_metrics(workdir) if key in r]


def test_two_processes_resumed_match_one_process(runs):
  got = {r["step"]: r for r in _rows(runs["mp_dir"], "train/loss")}
  ref = {r["step"]: r for r in _rows(runs["ref_dir"], "train/loss")}
  assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6]
  for key in ("train/loss", "train/grad_norm"):
    np.testing.assert_allclose([got[s][key] for s in range(1, 7)], [ref[s][key] for s in range(1, 7)],
                               rtol=1e-5, err_msg=key)
  got_eval = {r["step"]: r["eval/param_norm"] for r in _rows(runs["mp_dir"], "eval/param_norm")}
  ref_eval = {r["step"]: r["eval/param_norm"] for r in _rows(runs["ref_dir"], "eval/param_norm")}
  np.testing.assert_allclose(got_eval[6], ref_eval[6], rtol=1e-5)


def test_every_process_joined_and_resumed(runs):
  for log in (runs["first"], runs["second"]):
    assert "devices: 8 (cpu), processes: 2" in log
  assert "resuming from checkpoint at step 3" in runs["second"]
  assert "resuming from checkpoint at step 3" in runs["second_p1"]  # process 1 restored its shards too
  steps = sorted(int(d) for d in os.listdir(os.path.join(runs["mp_dir"], "checkpoints")) if d.isdigit())
  assert steps == [3, 6]


def test_process_0_alone_writes_metrics(runs):
  """One row per logged step and one eval row per evaluation: process 1 wrote nothing."""
  assert [r["step"] for r in _rows(runs["mp_dir"], "train/loss")] == [1, 2, 3, 4, 5, 6]
  assert [r["step"] for r in _rows(runs["mp_dir"], "eval/param_norm")] == [3, 6]  # eval_at_end of each launch
  assert os.path.exists(os.path.join(runs["mp_dir"], "config_train.json"))
