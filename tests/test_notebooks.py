"""Execute the example notebooks (offline, random weights, small configs), as CI does.

Each notebook runs in a fresh kernel of the interpreter running the tests, with ``examples/`` as the working
directory; a failing cell fails the test with the cell's error. The committed notebooks must have their
outputs stripped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = ["01_retrofit_pretrained.ipynb", "02_look_inside.ipynb", "03_reproduction.ipynb"]
CELL_TIMEOUT = 120


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec that runs this very interpreter (not whatever 'python3' a user's Jupyter resolves to)."""
    d = tmp_path_factory.mktemp("kernels")
    spec = d / "localify-test"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "localify tests", "language": "python",
    }))
    return d


def run_notebook(path: Path, kernel_dir: Path) -> nbformat.NotebookNode:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name="localify-test",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, kernel_name="localify-test",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()
    return nb


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stripped(name):
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_dir):
    nb = run_notebook(EXAMPLES / name, kernel_dir)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    if name != "01_retrofit_pretrained.ipynb":  # the figures were drawn
        assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
