"""notebooks/quickstart.ipynb runs end to end (every code cell, in order, headless)."""

import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes():
    matplotlib.use("Agg")
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [("".join(c["source"]), i) for i, c in enumerate(cells) if c["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    namespace: dict = {"__name__": "__main__"}
    for source, index in code:
        exec(compile(source, f"{NOTEBOOK.name}[cell {index}]", "exec"), namespace)
    # The notebook's own results: a score per α and per CG budget, all in [0, 1.2].
    for key in ("ta_scores", "scores"):
        values = namespace[key]
        assert len(values) > 0 and all(0.0 <= v <= 1.2 for v in values), (key, values)
