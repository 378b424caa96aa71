"""Every notebook in notebooks/ runs top to bottom (with DIFFUSION_JAX_NOTEBOOK_SMOKE=1: the same cells on
seconds-long settings), shows at least one image inline, and opens with its "Open in Colab" badge and setup cell.

`DIFFUSION_JAX_NOTEBOOK_SMOKE=0 python -m pytest -n 0 tests/test_notebooks.py --durations=0` runs them as a user
would (the README's times)."""
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_and_shows_images(path, monkeypatch, tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(path, as_version=4)
  name = os.path.basename(path)
  assert "colab.research.google.com/github/" in nb.cells[0].source and name in nb.cells[0].source
  assert "google.colab" in nb.cells[1].source  # the install cell
  monkeypatch.setenv("DIFFUSION_JAX_NOTEBOOK_SMOKE", os.environ.get("DIFFUSION_JAX_NOTEBOOK_SMOKE", "1"))
  # /tmp workdirs inside the notebooks are per test run: a run left by an earlier test session must not be resumed.
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.source = cell.source.replace('"/tmp/', f'"{tmp_path}/')
  nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} shows no image"
