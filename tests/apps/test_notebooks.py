"""The notebooks in notebooks/ run top to bottom on the shipped organism, offline (each ends with a cell
asserting the organism's ground truth; 06_real_model runs on SmolLM2-135M-Instruct where it is fetched, and
checks its intervals), and every plotly figure they show carries data: the executed
notebook's Plotly JSON outputs are read back and each trace must hold finite numbers, and every HTML page a
notebook writes opens in headless Chromium with every figure rendered (the `browser` fixture).

Notebooks execute in memory (nothing is written back), with the kernel's working directory in
notebooks/ and LENS_BIAS_NB_OUT pointing at a temporary directory for any file a notebook writes.
"""

import base64
import math
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
PLOTLY = "application/vnd.plotly.v1+json"
CELL_TIMEOUT = 300  # seconds per cell; each notebook takes well under a minute in all
DATA_KEYS = ("x", "y", "z", "values", "r")
#: notebooks that walk through a real pretrained model: run where it is on this machine (CI fetches it); marked
#: slow (a few CPU minutes: `-m "not slow"` leaves them out)
REAL_MODEL = {"06_real_model": "smollm2-135m-instruct"}


def _model_here(name: str) -> bool:
    from lens_bias.core.model_names import MODELS, converted_dir, package_file

    return (converted_dir(name) / "config.json").is_file() or package_file(MODELS[name]) is not None


def _numbers(v) -> list[float]:
    """The numbers in a plotly data array: nested lists, or a typed array {'dtype', 'bdata', 'shape'}
    (plotly ≥ 6 encodes numpy arrays so). JSON null (plotly's encoding of NaN) counts as NaN; strings
    (category labels) are skipped."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype("<" + v["dtype"])).astype(float).tolist()
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _numbers(item)]
    if v is None:
        return [math.nan]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return [float(v)]
    return []


def _trace_numbers(trace: dict) -> list[float]:
    nums = [x for k in DATA_KEYS if k in trace for x in _numbers(trace[k])]
    err = trace.get("error_y") or {}
    return nums + (_numbers(err["array"]) if "array" in err else [])


def _figures(nb) -> list[tuple[int, dict]]:
    return [(i, out["data"][PLOTLY]) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
            for out in cell.get("outputs", []) if PLOTLY in out.get("data", {})]


def test_notebooks_are_found_and_stored_without_outputs():
    assert len(NOTEBOOKS) >= 3, f"expected the notebooks in {NB_DIR}, found {NOTEBOOKS}"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert nb.cells[0].cell_type == "markdown", f"{path.name}: starts with a markdown intro"
        assert "import lens_bias as lb" in code[0].source, f"{path.name}: first code cell imports lens_bias as lb"
        stored = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not stored, f"{path.name}: cells {stored} are stored with outputs (strip them)"


def test_figure_check_reads_typed_arrays_and_rejects_nan():
    typed = {"dtype": "f8", "bdata": base64.b64encode(np.array([1.5, -2.0]).tobytes()).decode()}
    assert _trace_numbers({"type": "bar", "x": ["a", "b"], "y": typed}) == [1.5, -2.0]
    assert math.isnan(_trace_numbers({"type": "heatmap", "x": ["p0", "p1"], "z": [[1, 2], [3, None]]})[-1])
    assert _trace_numbers({"type": "bar", "x": ["a"], "y": []}) == []


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in REAL_MODEL else p
                                  for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_its_figures_have_data(path, tmp_path, monkeypatch, browser):
    if path.stem in REAL_MODEL and not _model_here(REAL_MODEL[path.stem]):
        pytest.skip(f"{path.name} needs {REAL_MODEL[path.stem]}: `lens-bias fetch {REAL_MODEL[path.stem]}`")
    monkeypatch.setenv("LENS_BIAS_NB_OUT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the organism is tiny: one thread is as fast, and spares the run from oversubscribed cores
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = sorted(p.relative_to(NB_DIR) for p in NB_DIR.rglob("*"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails

    assert sorted(p.relative_to(NB_DIR) for p in NB_DIR.rglob("*")) == before, "the notebook wrote into notebooks/"
    figures = _figures(nb)
    assert figures, f"{path.name} showed no plotly figure as {PLOTLY} (set pio.renderers.default = 'plotly_mimetype')"
    for cell, fig in figures:
        title = fig.get("layout", {}).get("title") or ""
        title = title.get("text", "") if isinstance(title, dict) else title
        assert fig.get("data"), f"{path.name} cell {cell}: figure {title!r} has no traces"
        for k, trace in enumerate(fig["data"]):
            nums = _trace_numbers(trace)
            assert nums, f"{path.name} cell {cell}: figure {title!r} trace {k} ({trace.get('type')}) has no numbers"
            bad = sum(not math.isfinite(x) for x in nums)
            assert not bad, f"{path.name} cell {cell}: figure {title!r} trace {k} has {bad} non-finite values"
    for page in sorted(tmp_path.rglob("*.html")):  # the pages a notebook writes (05: report.html) render in Chromium
        browser(page)
