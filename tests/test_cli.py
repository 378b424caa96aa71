"""`python -m diffusion_jax.main`: bad input is one clear line and exit code 2."""
import os
import subprocess
import sys

import pytest

from tests.conftest import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=900):  # generous: a loaded 2-core CI machine compiles slowly; a hang still fails
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}")
  return subprocess.run([sys.executable, "-m", "diffusion_jax.main", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _error_line(proc):
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr[-2000:]
  return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--config.train.no_such_key=3"], "unknown config key 'train.no_such_key'"),
    (["--bogus_flag=1"], "unknown flag"),
    (["--config.train.steps=abc"], "steps"),
    (["--config.optim.lr=fast"], "lr"),
    (["--config.data.source=array_record"], "path"),
    (["--config.data.source=webdataset"], "webdataset"),
    (["--config.data.source=image_folder", "--config.data.path=/nonexistent/folder"], "/nonexistent/folder"),
    (["--mode=sample"], "no checkpoint"),
    (["--mode=fly"], "mode"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, expected):
  proc = run_cli("--config", "configs/mnist_ddpm.py:tiny", "--workdir", str(tmp_path), *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = _error_line(proc)
  assert expected in line
  assert "Traceback" not in proc.stderr


def test_missing_config_and_workdir_flags(tmp_path):
  proc = run_cli("--workdir", str(tmp_path))
  assert proc.returncode == 2 and "--config" in _error_line(proc)
  proc = run_cli("--config", "configs/mnist_ddpm.py:tiny")
  assert proc.returncode == 2 and "--workdir" in _error_line(proc)


def test_unknown_config_argument(tmp_path):
  proc = run_cli("--config", "configs/mnist_ddpm.py:huge", "--workdir", str(tmp_path))
  assert proc.returncode == 2 and "huge" in _error_line(proc)
