"""Every notebook in notebooks/ runs top to bottom (offline: a tiny model or the bundled demo
model), in a kernel started from this interpreter, with no errors in its outputs and the numbers
it shows."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {  # what a notebook must print, beyond running without errors
    "quickstart.ipynb": ["The pass key is 52445", "cache hit: True"],  # demo model, example PDF
    "langchain.ipynb": ["cache hit: True"],
    "llamaindex.ipynb": ["LLM calls: 1", "cache hit: True"],
}


def run_notebook(path: Path, tmp_path: Path, monkeypatch) -> nbformat.NotebookNode:
    """Execute a notebook in a kernel started from this interpreter (this venv), in tmp_path.

    A kernelspec named python3 pointing at sys.executable goes first on JUPYTER_PATH, so a
    fresh CI venv needs nothing installed beyond ipykernel itself.
    """
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (tests)", "language": "python"}
    spec.joinpath("kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("BEACON_APPS_MODEL", raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    return notebook


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch):
    notebook = run_notebook(path, tmp_path, monkeypatch)
    outputs = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    ]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, [f"{o.get('ename')}: {o.get('evalue')}" for o in errors]
    text = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs
    )
    for expected in EXPECTED.get(path.name, []):
        assert expected in text, f"{path.name} did not print {expected!r}"
