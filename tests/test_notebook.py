"""notebooks/quickstart.ipynb runs top to bottom (smoke size) and reports sane numbers."""

import math
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(monkeypatch):
    monkeypatch.setenv("QUICKSTART_STEPS", "60")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    resources = {"metadata": {"path": str(NOTEBOOK.parent)}}
    NotebookClient(nb, timeout=300, kernel_name="python3", resources=resources).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "gap closure" in text and "GPT2LMHeadModel MLP width 256 of 512" in text
    ratio = float(text.split("val loss ratio ")[1].split()[0])
    assert math.isfinite(ratio) and 0.5 < ratio < 2.0
