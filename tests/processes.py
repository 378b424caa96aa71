"""Runs a training script in a child process and kills it mid-run, as a preemption or an OOM killer would."""
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kill_after_checkpoints(script: str, workdir: str, count: int = 2, timeout: float = 240) -> None:
  """Starts `script` (Python source) and SIGKILLs it once `count` checkpoints of `workdir` are committed, while
  later saves are in flight."""
  proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          cwd=REPO)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  try:
    while time.time() < deadline and not (os.path.isdir(ckpt_dir) and
                                          len([d for d in os.listdir(ckpt_dir) if d.isdigit()]) >= count):
      time.sleep(0.2)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
