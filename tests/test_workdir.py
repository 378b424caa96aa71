"""train/workdir.py: unusable workdirs are one-line errors, eval/sample create nothing, one run holds a workdir."""
import os
import signal
import subprocess
import sys

import pytest

from diffusion_jax.train.workdir import WorkdirError, WorkdirLock, has_checkpoint, prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_workdir_that_is_a_file_or_inside_one(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(WorkdirError, match=f"^--workdir {f} is a file; give a folder$"):
    prepare(str(f), need_checkpoint=False)
  with pytest.raises(WorkdirError, match=f"^--workdir {f}/run/a is inside {f}, which is a file; give a folder$"):
    prepare(str(f / "run" / "a"), need_checkpoint=False)


def _read_only_folder(tmp_path):
  folder = tmp_path / "ro"
  folder.mkdir()
  folder.chmod(0o500)
  if os.access(folder, os.W_OK):  # root ignores permission bits; sysfs refuses new files even to root
    folder = "/sys/fs"
    if not os.path.isdir(folder):
      pytest.skip("no folder this user cannot write to")
  return str(folder)


def test_read_only_workdir(tmp_path):
  folder = _read_only_folder(tmp_path)
  prepare(folder, need_checkpoint=False)  # exists: nothing to create
  # (Permission denied, or for /sys "Operation not permitted")
  with pytest.raises(WorkdirError, match=f"^--workdir {folder} is not writable: (Permission denied|Operation not permitted)$"):
    WorkdirLock(folder).acquire()
  with pytest.raises(WorkdirError, match=f"^cannot create --workdir {folder}/run: (Permission denied|Operation not permitted)$"):
    prepare(os.path.join(folder, "run"), need_checkpoint=False)


def test_eval_and_sample_need_a_committed_checkpoint_and_create_nothing(tmp_path):
  run = tmp_path / "run"
  with pytest.raises(WorkdirError, match="no checkpoint in .*run/checkpoints: train first"):
    prepare(str(run), need_checkpoint=True)
  assert not run.exists()
  (run / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)  # an unfinished save is not a checkpoint
  with pytest.raises(WorkdirError):
    prepare(str(run), need_checkpoint=True)
  assert os.listdir(run) == ["checkpoints"]
  (run / "checkpoints" / "2").mkdir()
  assert has_checkpoint(str(run))
  prepare(str(run), need_checkpoint=True)


def test_second_lock_names_the_holder_and_release_frees_it(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirError, match=f"is in use by another run \\(pid {os.getpid()} on "):
      WorkdirLock(str(tmp_path)).acquire()
  with WorkdirLock(str(tmp_path)):  # released on exit
    pass


def test_lock_dies_with_its_process(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from diffusion_jax.train.workdir import WorkdirLock; "
       f"WorkdirLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirError, match=f"pid {holder.pid} on "):
      WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with WorkdirLock(str(tmp_path)):  # no stale lock after SIGKILL
    pass
