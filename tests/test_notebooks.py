"""The notebooks: committed without outputs, and each executed top to bottom (nbmake) with small parameters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_five_notebooks_and_none_holds_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_landscapes.ipynb",
        "03_theorem2.ipynb",
        "04_sharpness_generalization.ipynb",
        "05_llm_sharpness.ipynb",
    ]
    for path in NOTEBOOKS:
        book = json.loads(path.read_text())
        for cell in book["cells"]:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, path.name
        params = [c for c in book["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1 and params[0]["metadata"]["nbmake"]["mock"], path.name  # the small test run


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_with_its_small_parameters(notebook, tmp_path):
    pytest.importorskip("nbmake")
    shutil.copy(notebook, tmp_path / notebook.name)  # its runs/ land in tmp, not in the repository
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--nbmake",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(tmp_path),
        "--nbmake-timeout",
        "1200",
        str(tmp_path / notebook.name),
    ]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:]
