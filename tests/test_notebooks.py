"""The colab notebooks, as a Colab user meets them.

Each notebook runs top to bottom in a real Jupyter kernel (nbclient + ipykernel, the ``dev``
extra), so IPython syntax (``%pip``), rich display (the plot comes back as an image) and the
kernel's own process all count, at a small size (``JAXQUANT_SMALL=1``, which the notebooks
read). The stored files carry no outputs, open with an "Open in Colab" badge pointing at
themselves, and install jaxquant first on a fresh runtime (skipped where it is importable).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

COLAB = Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
REPO_URL = "https://github.com/jaxquant/jaxquant"
INSTALL = f"%pip install -q git+{REPO_URL}"
ids = [p.name for p in NOTEBOOKS]


def _cells(path: Path, kind: str) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == kind]


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {COLAB}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_stored_without_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
                f"{path.name} cell {i} has outputs: clear them before committing "
                "(Jupyter: Edit > Clear all outputs)"
            )
    assert "widgets" not in nb.get("metadata", {}), f"{path.name}: widget state is stored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_opens_with_a_colab_badge_for_itself(path):
    first = _source(json.loads(path.read_text())["cells"][0])
    url = f"https://colab.research.google.com/github/jaxquant/jaxquant/blob/main/colab/{path.name}"
    assert re.search(
        rf"\[!\[Open In Colab\]\([^)]*colab-badge\.svg\)\]\({re.escape(url)}\)", first
    ), f"{path.name}: the first cell needs the badge [![Open In Colab](...colab-badge.svg)]({url})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_first_code_cell_installs_jaxquant_only_when_missing(path):
    lines = _source(_cells(path, "code")[0]).splitlines()
    code = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    assert code == ["try:", "import jaxquant  # noqa: F401", "except ImportError:", INSTALL], (
        f"{path.name}: the first code cell must install jaxquant on a fresh Colab runtime, "
        f"guarded: try: import jaxquant / except ImportError: {INSTALL}"
    )


@pytest.fixture(scope="module")
def kernel_env():
    """The kernel inherits the environment: small sizes, and the tests' CPU backend."""
    pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbclient, ipykernel)")
    pytest.importorskip("ipykernel", reason="pip install -e '.[dev]' (nbclient, ipykernel)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXQUANT_SMALL", "1")
        yield


@pytest.mark.slow  # minutes of CPU on 2 cores; CI runs it in its slow pass
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs_in_a_kernel(path, kernel_env, tmp_path):
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    # One more cell after the notebook's own: the kernel runs `%pip` for real (the install cell
    # skips it because jaxquant is importable here).
    nb.cells.append(nbformat.v4.new_code_cell("%pip --version"))
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert re.search(r"\bpip \d+\.", text), f"%pip did not run in the kernel: {text[-500:]}"
    assert "Traceback" not in text
    if any("plt.show()" in c.source for c in nb.cells if c.cell_type == "code"):
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert images, f"{path.name}: a plot was shown but no image came back from the kernel"
