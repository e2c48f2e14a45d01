"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom headless.

    .venv/bin/python -m pytest -q tests/test_notebooks.py               # the fast check (no outputs committed)
    .venv/bin/python -m pytest -q -m slow tests/test_notebooks.py -s    # executes them all with nbclient

Execution uses the venv's ``python3`` kernel with cwd ``notebooks/``, one work directory for all
notebooks of the test session (so the embedded CPT pool is built once; set
``OPTIMER_TEST_NOTEBOOK_WORKDIR`` to reuse one between sessions), ``OPTIMER_THREADS=2`` and
``OPTIMER_NB_TRIALS=4``. Durations go to ``test-artifacts/notebook-durations.json``. Measured on the
project's 2 CPU cores shared with other jobs (load average 3-7), fresh work directory: 01 88 s (builds
the pool), 02 27 s, 03 282 s, 04 223 s, 10.5 min in all; a later warm run under heavier load: 01 168 s,
02 113 s; 05 (pool copied in) 466 s at load average 8-10 (96 s of CPU). On such busy cores one torch thread
scored 3-5x faster than two (``THREADS``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
TRIALS = "4"
THREADS = "2"
CELL_TIMEOUT_S = 1800  # the first notebook builds the CPT pool: minutes on two busy cores
DURATIONS = ROOT / "test-artifacts" / "notebook-durations.json"


def test_every_notebook_is_committed_without_outputs():
    import nbformat  # here, not at the top: its schema checker takes ~1 s to import in every test worker

    assert [p.name[:3] for p in NOTEBOOKS][:4] == ["01_", "02_", "03_", "04_"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (
                    f"{path.name} cell {i} has outputs: clear them before committing "
                    "(.venv/bin/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)")


@pytest.fixture(scope="session")
def notebook_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("OPTIMER_TEST_NOTEBOOK_WORKDIR")
    return Path(given).resolve() if given else tmp_path_factory.mktemp("notebooks")


def _texts(nb) -> str:
    """Everything the notebook printed or displayed as text/plain."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif o.output_type == "error":
                out.append(f"{o.ename}: {o.evalue}")
            elif "data" in o:
                out.append(str(o.data.get("text/plain", "")))
    return "\n".join(out)


def _mimetypes(nb) -> list[str]:
    return [m for cell in nb.cells for o in cell.get("outputs", []) for m in o.get("data", {})]


CHECKS = {
    "01_quickstart": ["metrics:", "chart traces:", "'current'", "> What is 34 + 17?", "Tune merge:"],
    "02_search": ["best α:", "rank  trial", "merge_method: task_arithmetic", "weight:"],
    "03_findings": ["off-diagonal cosine:", "evaluations in"],
    "04_bring_your_own_model": ["merge_method: task_arithmetic", "base_model:", "weight:"],
    "05_arena": ["vote(s) stored so far", "votes:", "best α:", "best estimate:", "Tune merge:",
                 "merge_method: task_arithmetic"],
}
# cells showing ipywidgets (sliders, chat, search runner, arena; 05 shows the arena twice)
WIDGETS = {"01_quickstart": 2, "02_search": 2, "05_arena": 3}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_headless(path: Path, notebook_workdir: Path, monkeypatch: pytest.MonkeyPatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("OPTIMER_NOTEBOOK_WORKDIR", str(notebook_workdir))
    monkeypatch.setenv("OPTIMER_THREADS", THREADS)
    monkeypatch.setenv("OPTIMER_NB_TRIALS", TRIALS)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and traceback) on the first failing cell
    seconds = round(time.perf_counter() - t0, 1)
    print(f"\n{path.name}: {seconds} s")
    DURATIONS.parent.mkdir(exist_ok=True)
    durations = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    DURATIONS.write_text(json.dumps({**durations, path.name: seconds}, indent=2))

    text = _texts(nb)
    assert not any(o.output_type == "error" for c in nb.cells for o in c.get("outputs", []))
    for needle in CHECKS.get(path.stem, []):
        assert needle in text, f"{path.name} did not print {needle!r}"
    views = _mimetypes(nb).count("application/vnd.jupyter.widget-view+json")
    assert views >= WIDGETS.get(path.stem, 0), f"{path.name} shows {views} widgets"
    if path.stem == "02_search":
        assert (notebook_workdir / "exports" / "02-search-best" / "config.json").is_file()
        assert _mimetypes(nb).count("application/vnd.plotly.v1+json") >= 4   # optuna plots + Pareto front
    if path.stem == "05_arena":  # the votes are in the study storage; the export holds the arena's best estimate
        from optimer_lib.merging.recipes import load_recipe
        from optimer_lib.search.arena import Arena

        arena = Arena.open(["ja", "zh", "math", "code"], storage=f"sqlite:///{notebook_workdir / 'arena.db'}",
                           study_name="notebook-05")
        assert len(arena.votes) >= int(TRIALS) + 2 and arena.best() is not None
        exported = load_recipe(notebook_workdir / "exports" / "05-arena-best").weights
        assert {n: exported[n] for n in arena.names} == pytest.approx(arena.best().weights, abs=1e-12)
        assert exported["instruct"] == 1.0  # the instruction model entry (named by its folder) at the arena's weight
