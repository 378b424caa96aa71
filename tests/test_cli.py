"""`python -m diffusion_jax.main`: bad input is one clear line and exit code 2."""
import os
import shutil
import socket
import subprocess
import sys

import pytest

from diffusion_jax.train.workdir import WorkdirLock
from tests.conftest import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=900, cwd=REPO, env=None):  # generous: a loaded 2-core CI machine compiles slowly
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}",
             **(env or {}))
  return subprocess.run([sys.executable, "-m", "diffusion_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _error_line(proc):
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr[-2000:]
  # Said once: not also logged (absl's "E... main.py] <message>" line) before being printed.
  assert proc.stderr.count(lines[0].removeprefix("error: ")) == 1, proc.stderr[-2000:]
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
    (["--config.train.batch_size=0"], "train.batch_size must be an integer >= 1, got 0"),
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
  # The config's own message, whole (its closing quote included), with no traceback folded into the line.
  assert proc.returncode == 2
  assert _error_line(proc) == "error: configs/mnist_ddpm.py:huge: unknown config argument 'huge'; use '', 'tiny', 'unconditional' or 'class'"


def test_broken_config_file_is_one_line(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("import ml_collections\n\ndef get_config(:\n  pass\n")
  proc = run_cli("--config", str(broken), "--workdir", str(tmp_path / "w"))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert _error_line(proc) == f"error: {broken} line 3: syntax error: invalid syntax"


def test_config_loads_from_any_directory_and_location(tmp_path):
  """As after `pip install`: only the package importable (no `configs` package on the path), run from elsewhere."""
  site, home = tmp_path / "site", tmp_path / "home"
  site.mkdir()
  home.mkdir()
  os.symlink(os.path.join(REPO, "diffusion_jax"), site / "diffusion_jax")
  env = {"PYTHONPATH": str(site)}
  # A config importing a sibling config (mnist_ldm -> mnist_ddpm), by absolute path, in the `--config PATH` spelling;
  # `--mode sample` on a new workdir then stops at the missing checkpoint, past loading, and creates nothing.
  workdir = tmp_path / "new" / "run"
  proc = run_cli("--config", os.path.join(REPO, "configs", "mnist_ldm.py:tiny"), "--workdir", str(workdir),
                 "--mode", "sample", cwd=home, env=env)
  assert proc.returncode == 2 and "no checkpoint" in _error_line(proc), proc.stderr[-2000:]
  assert not (tmp_path / "new").exists()
  # A user's copy of a config elsewhere imports the shared defaults from the package; `--config=PATH:arg`.
  mine = tmp_path / "mine" / "my_ddpm.py"
  mine.parent.mkdir()
  shutil.copy(os.path.join(REPO, "configs", "mnist_ddpm.py"), mine)
  empty = tmp_path / "empty"
  empty.mkdir()
  proc = run_cli(f"--config={mine}:tiny", "--workdir", str(empty), "--mode", "eval", cwd=home, env=env)
  assert proc.returncode == 2 and "no checkpoint" in _error_line(proc), proc.stderr[-2000:]
  assert os.listdir(empty) == []  # no config_eval.json, no .lock


def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
  with WorkdirLock(str(tmp_path)):
    proc = run_cli("--config", "configs/mnist_ddpm.py:tiny", "--workdir", str(tmp_path))
  assert proc.returncode == 2
  line = _error_line(proc)
  assert f"--workdir {tmp_path} is in use by another run (pid {os.getpid()} on {socket.gethostname()}" in line
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_the_cli_restarts_itself_with_tcmalloc_once(tmp_path):
  """With tcmalloc installed, a command started without it runs with it (diffusion_jax/allocator.py); the switch
  turns that off; an error is still one line, said once."""
  from diffusion_jax import allocator
  if allocator.library() is None:
    pytest.skip(f"tcmalloc is not installed: {allocator.INSTALL_HINT}")
  args = ("--config", "configs/mnist_ddpm.py:tiny", "--workdir", str(tmp_path / "none"), "--mode", "eval")
  proc = run_cli(*args, env={"LD_PRELOAD": ""})
  assert proc.returncode == 2 and "allocator: tcmalloc; CPU convolutions: Eigen" in proc.stderr, proc.stderr[-2000:]
  assert _error_line(proc).startswith("error: ")
  proc = run_cli(*args, env={"LD_PRELOAD": "", allocator.SWITCH: "0"})
  assert "allocator: the system's malloc (DIFFUSION_JAX_TCMALLOC=0)" in proc.stderr, proc.stderr[-2000:]


def test_tcmalloc_is_added_to_the_preload_list_once(monkeypatch):
  from diffusion_jax import allocator
  monkeypatch.setattr(allocator, "library", lambda: "libtcmalloc_minimal.so.4")
  assert allocator.preload_environment({"A": "1"}) == {"A": "1", "LD_PRELOAD": "libtcmalloc_minimal.so.4"}
  assert allocator.preload_environment({"LD_PRELOAD": "libx.so"})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libx.so"
  assert allocator.preload_environment({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}) is None  # restarted
  assert allocator.preload_environment({allocator.SWITCH: "0"}) is None
  monkeypatch.setattr(allocator, "library", lambda: None)
  assert allocator.preload_environment({}) is None  # not installed: the CLI runs as it is


def test_the_persistent_compilation_cache_is_on_by_default_under_the_users_cache(monkeypatch, tmp_path):
  from diffusion_jax.train import runtime
  monkeypatch.delenv(runtime.CACHE_VARIABLE, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert runtime.compilation_cache_dir() == str(tmp_path / "diffusion_jax" / "xla")
  monkeypatch.setenv(runtime.CACHE_VARIABLE, "/somewhere/else")
  assert runtime.compilation_cache_dir() == "/somewhere/else"
  assert runtime.compilation_cache_dir("~/mine") == os.path.expanduser("~/mine")  # the config's setting wins
  assert runtime.compilation_cache_dir("off") == ""
  monkeypatch.setenv(runtime.CACHE_VARIABLE, "off")
  assert runtime.compilation_cache_dir() == ""
