"""The README's Python examples run as written."""

import re
from pathlib import Path

import chex
import jax

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_merges_agree_with_closed_forms():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    import jmerge

    # MaTS with diagonal Fisher curvature is Fisher merging (closed form).
    want = jmerge.fisher_merge(ns["fts"], ns["fishers"])
    chex.assert_trees_all_close(ns["res"].params, want, rtol=1e-4, atol=1e-6)
    assert bool(ns["res"].info["converged"])
    chex.assert_trees_all_equal_shapes_and_dtypes(ns["ta"], ns["theta0"])
    assert jax.tree_util.tree_structure(ns["gm"].params) == jax.tree_util.tree_structure(
        ns["theta0"]
    )
