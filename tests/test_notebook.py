"""notebooks/quickstart.ipynb runs headless in a Jupyter kernel (nbclient) on 8 host devices.

Every cell runs in order in a fresh ``python3`` kernel of this interpreter; an error in any
cell fails the test with that cell's traceback. The kernel gets 8 host CPU devices and XLA's
cheap optimisation passes through ``XLA_FLAGS`` (float32, as a user runs it). The notebook's
last cell prints its results as one ``RESULTS {json}`` line, checked here.
"""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)


def _stdout(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    )


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    # The kernel inherits this environment: 8 host devices, float32, this interpreter first.
    monkeypatch.setenv("XLA_FLAGS", FLAGS)
    monkeypatch.delenv("JAX_ENABLE_X64", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv(
        "PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    )
    root = str(NOTEBOOK.parents[1])
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    text = _stdout(nb)
    assert "8 CPU (no accelerator attached) device(s)" in text, text
    assert "mesh: {'data': 1, 'model': 8}" in text, text
    assert "P(None, 'model')" in text, text  # a sharded kernel, printed
    line = next(ln for ln in text.splitlines() if ln.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert results["devices"] == 8
    for key in ("ta_scores", "scores"):
        values = results[key]
        assert len(values) > 0 and all(0.0 <= v <= 1.2 for v in values), (key, values)
    # MaTS from task arithmetic (α = 0.4) is not worse than its start after 20 CG steps.
    assert results["scores"][-1] >= results["scores"][0] - 0.05, results
