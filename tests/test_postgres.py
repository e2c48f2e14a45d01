"""Several ``optimer search`` workers sharing one study on a real PostgreSQL server (the multi-machine story).

    .venv/bin/python -m pytest -m slow -rs tests/test_postgres.py

A throwaway server (``tests/pg.py``: Debian's binaries, initdb into a temp dir, a free port) holds the study;
every test gets its own database. Three worker processes run the real command with ``--storage postgresql://``
on the workbench's tiny pool, for a single objective and for a Pareto search (``--objectives``):
- together they end with exactly ``--trials`` counted trials: consecutive trial numbers, no two trials with the
  same weights, every worker contributed, nothing left running (seeds 0, 1000, 2000: see the next point);
- a worker that joins late with the next seed (the docs' ``--seed $RANK``) does not replay another worker's
  proposals (a resumed sampler once used ``seed + len(trials)``: worker 0 joining a one-trial study drew worker 1's);
- a worker killed with SIGKILL while it holds a running trial loses none of its finished trials, and re-running
  the command completes the study to the total (the dead worker's trial is failed as interrupted);
- the workbench's Search tab, given the ``postgresql://`` URL, lists and plots that study and sends its best
  trial to Tune (Debian chromium, fixtures of ``test_workbench_browser``).
Trials take ~0.2 s (an objective file that also holds every worker at a barrier until all three are up).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from pg import create_database, missing, postgres_server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(missing()), reason=str(missing()))]
WORKERS = 3
OBJECTIVE = '''
import os, pathlib, time
DIR = pathlib.Path(os.environ["WORKERS_DIR"])
(DIR / f"ready-{os.getpid()}").touch()           # at import, i.e. when the worker parses its objective
CALLS = 0


def slow(model, tokenizer):
    global CALLS
    deadline = time.time() + 180                  # start trials only once every worker is up
    while len(list(DIR.glob("ready-*"))) < int(os.environ["N_WORKERS"]) and time.time() < deadline:
        time.sleep(0.05)
    CALLS += 1
    if CALLS == int(os.environ.get("HANG_AT", "0")):  # the victim: hold this trial until killed
        (DIR / f"hanging-{os.getpid()}").touch()
        time.sleep(3600)
    time.sleep(0.2)
    return float(sum(p.detach().float().abs().sum() for p in model.parameters()))


def norm(model, tokenizer):                       # a second objective for the Pareto search
    return float(sum(p.detach().float().pow(2).sum() for p in model.parameters()))
'''


@pytest.fixture(scope="module")
def server_url():
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workbench test pool (tiny llama base, vectors ja and math), the objective file and a dev corpus."""
    from test_workbench_session import tiny_workdir

    root = tiny_workdir(tmp_path_factory.mktemp("pgpool") / "workdir")
    (root / "obj.py").write_text(OBJECTIVE)
    (root / "notes.txt").write_text("\n\n".join(f"the quick brown fox {i}" for i in range(8)))
    return root


def db_url(server_url: str, request: pytest.FixtureRequest) -> str:
    """A fresh database named after the test (its parameters included) on the module's server."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name.lower())
    return create_database(server_url, f"t{zlib.crc32(name.encode()):08x}_{name[-40:]}")


def worker(root: Path, url: str, mode: str, trials: int, seed: int, run_dir: Path,
           hang_at: int = 0, n_workers: int = WORKERS) -> subprocess.Popen:
    """One ``optimer search`` process on the shared study (its own --workdir and --seed)."""
    objective = (["--objectives", f"{root / 'obj.py'}:slow", f"{root / 'obj.py'}:norm"] if mode == "pareto"
                 else ["--objective", f"{root / 'obj.py'}:slow", "--top-k", "0"])
    argv = [sys.executable, "-m", "optimer_lib.cli", "search", "--base", root / "base",
            "--vector", root / "vectors" / "ja.safetensors", "--vector", root / "vectors" / "math.safetensors",
            "--eval", f"notes={root / 'notes.txt'}", *objective, "--trials", trials, "--sampler", "random",
            "--storage", url, "--study", "shared", "--seed", seed, "--workdir", run_dir / f"w{seed}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKERS_DIR": str(run_dir), "N_WORKERS": str(n_workers),
           "HANG_AT": str(hang_at)}
    return subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def finish(proc: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def wait_for_file(folder: Path, pattern: str, procs: list[subprocess.Popen], timeout: float = 300) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        dead = [p for p in procs if p.poll() is not None and p.returncode != 0]
        assert not dead, dead[0].stderr.read()[-3000:] if dead[0].stderr else "a worker failed"
        time.sleep(0.1)
    raise AssertionError(f"no {pattern} in {folder} after {timeout} s")


def check_study(study: optuna.Study, total: int, workers: set[str]) -> list[optuna.trial.FrozenTrial]:
    """The study holds exactly ``total`` counted trials, all COMPLETE, by ``workers``; returns them."""
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # no duplicate or missing number
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]  # nothing left hanging
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == total, f"{len(done)} complete trials, asked for {total}"
    others = [t for t in trials if t.state != TrialState.COMPLETE]
    assert all(t.user_attrs.get("interrupted") for t in others)  # only dropped surplus asks or a killed trial
    params = {tuple(sorted(t.params.items())) for t in done}
    assert len(params) == total  # no trial scored twice (a slot claimed by two workers)
    assert all(t.user_attrs["weights"] == pytest.approx(t.params) for t in done)
    assert {t.user_attrs["worker"] for t in done} == workers  # every worker took a share, no one else did
    return done


MODES = ["search", "pareto"]


# Worker seeds far apart, so that no sampler seeding can make two workers propose the same point (joining with
# the next seed is test_a_late_worker_with_the_next_seed_draws_new_weights): equal weights here can only mean a
# trial slot that two workers claimed and scored.
SEEDS = (0, 1000, 2000)


@pytest.mark.parametrize("mode", MODES)
def test_three_workers_finish_exactly_the_requested_trials(server_url, pool, tmp_path, request, mode):
    url, n = db_url(server_url, request), 12
    procs = [worker(pool, url, mode, n, seed, tmp_path) for seed in SEEDS]
    outs = [finish(p) for p in procs]
    study = optuna.load_study(study_name="shared", storage=url)
    host = socket.gethostname()
    check_study(study, n, {f"{host}:{p.pid}" for p in procs})
    if mode == "pareto":
        assert len(study.directions) == 2 and all(o["front"] for o in outs)
        # the last worker to finish saw the whole study: its pareto.json counts every trial
        assert max(json.loads((tmp_path / f"w{s}" / "pareto.json").read_text())["trials"] for s in SEEDS) == n
    else:
        assert max(json.loads((tmp_path / f"w{s}" / "best.json").read_text())["trials"] for s in SEEDS) == n


@pytest.mark.parametrize("mode", MODES)
def test_killed_worker_loses_no_finished_trial_and_a_rerun_completes(server_url, pool, tmp_path, request, mode):
    """Worker 0 finishes one trial, then hangs in its second until SIGKILL; the others stop at the total
    (its running trial holds a slot while it lives); a re-run after the kill completes the study."""
    url, n = db_url(server_url, request), 9
    victim = worker(pool, url, mode, n, SEEDS[0], tmp_path, hang_at=2)
    others = [worker(pool, url, mode, n, seed, tmp_path) for seed in SEEDS[1:]]
    wait_for_file(tmp_path, "hanging-*", [victim, *others])
    for p in others:
        finish(p)
    host = socket.gethostname()
    study = optuna.load_study(study_name="shared", storage=url)
    trials = study.get_trials(deepcopy=False)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    assert [t.user_attrs["worker"] for t in running] == [f"{host}:{victim.pid}"]
    before = {t.number: (t.params, t.values, t.user_attrs["worker"]) for t in trials if t.state == TrialState.COMPLETE}
    assert len(before) == n - 1  # the others stopped: the victim's running trial holds the last slot
    assert sum(w == f"{host}:{victim.pid}" for _, _, w in before.values()) == 1  # its finished trial

    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL

    rerun = worker(pool, url, mode, n, 3000, tmp_path, n_workers=0)  # the barrier is gone: WORKERS_DIR has them all
    finish(rerun)
    study = optuna.load_study(study_name="shared", storage=url)
    done = check_study(study, n, {f"{host}:{p.pid}" for p in (victim, *others, rerun)})
    after = {t.number: (t.params, t.values, t.user_attrs["worker"]) for t in done}
    assert {k: after[k] for k in before} == before  # every finished trial kept, unchanged
    killed = study.trials[running[0].number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["interrupted"]  # its slot was freed
    assert sum(w == f"{host}:{rerun.pid}" for _, _, w in after.values()) == 1  # the re-run added exactly one


@pytest.mark.parametrize("mode", MODES)
def test_a_late_worker_with_the_next_seed_draws_new_weights(server_url, pool, tmp_path, request, optimer, mode):
    """README: ``--seed $RANK`` per worker. Worker 1 runs first; worker 0 joins the study later (in this process)."""
    url = db_url(server_url, request)
    objective = ["--objectives", "loss:notes", "ppl:notes"] if mode == "pareto" else ["--objective", "loss:notes"]
    common = ["search", "--base", pool / "base", "--vector", pool / "vectors" / "ja.safetensors",
              "--vector", pool / "vectors" / "math.safetensors", "--eval", f"notes={pool / 'notes.txt'}",
              *objective, "--top-k", "0", "--sampler", "random", "--storage", url, "--study", "late"]
    optimer(*common, "--trials", 1, "--seed", 1, "--workdir", tmp_path / "w1")
    optimer(*common, "--trials", 2, "--seed", 0, "--workdir", tmp_path / "w0")
    first, second = optuna.load_study(study_name="late", storage=url).trials
    assert first.state == second.state == TrialState.COMPLETE
    assert first.params != second.params, "worker 0 replayed worker 1's first proposal"


@pytest.fixture(scope="module")
def watched_study(server_url, pool, tmp_path_factory) -> tuple[str, optuna.Study]:
    """A 9-trial study written by three workers into its own database (for the workbench to watch)."""
    url = create_database(server_url, "watched")
    run_dir = tmp_path_factory.mktemp("watched")
    procs = [worker(pool, url, "search", 9, seed, run_dir) for seed in SEEDS]
    for p in procs:
        finish(p)
    return url, optuna.load_study(study_name="shared", storage=url)


def test_workbench_lists_and_reads_a_postgres_study(watched_study):
    """The controller calls behind the Search tab (study list, study, best weights) read a postgresql:// URL."""
    from workbench.searching import best_params, load_study, study_names, study_table

    url, study = watched_study
    assert study_names(url) == ["shared"]
    loaded = load_study(url, "shared")
    assert loaded is not None and len(loaded.trials) == len(study.trials)
    table = study_table(loaded)
    assert len(table) == len(study.trials) and set(table["number"]) == {t.number for t in study.trials}
    best = min(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    assert best_params(loaded, ["ja", "math"]) == pytest.approx(best.params)


# The Search tab in a real browser, on the workbench server of test_workbench_browser (its pool has the same
# vector names, ja and math, so the watched study's best trial can be sent to its Tune sliders).
try:
    import test_workbench_browser as wb

    browser, server, page = wb.browser, wb.server, wb.page
    BROWSER_SKIP = wb.pytestmark
except RuntimeError as exc:  # CI without chromium: test_workbench_browser refuses to import
    BROWSER_SKIP = pytest.mark.skipif(True, reason=str(exc))


@BROWSER_SKIP
def test_search_tab_watches_a_postgres_study(watched_study, page):
    url, study = watched_study
    finished = sum(t.state.is_finished() for t in study.trials)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    best = min(complete, key=lambda t: t.value)
    page.get_by_role("tab", name="Tune").click()  # Gradio mounts a tab's sliders on first visit
    page.wait_for_selector("#alpha-0 input[type=number]")
    page.get_by_role("tab", name="Search").click()
    box = page.get_by_label("Optuna storage")
    box.fill(url)
    box.press("Tab")
    page.get_by_role("button", name="↻").click()
    # the status is Markdown: the study name renders as code, without its backticks
    page.wait_for_selector(f"#search-status >> text=/watching\\s*shared: {finished} finished trials/")

    def points() -> int:
        traces = wb.plot_data(page, "search-history")
        return max((len(t["y"]) for t in traces if t["name"] == "Objective Value"), default=0)

    wb.wait_for(lambda: points() == len(complete), what=f"{len(complete)} points in the optimisation history")
    rows = page.locator("#search-table [role=row][data-index]")
    wb.wait_for(lambda: rows.count() == len(study.trials), what="one table row per trial")
    page.screenshot(path=str(wb.ARTIFACTS / "workbench-postgres-study.png"), full_page=True)

    page.locator("#search-send-best").click()
    expect = [best.params[n] for n in ("ja", "math")]

    def sliders() -> list[float]:
        return [float(page.locator(f"#alpha-{i} input[type=number]").input_value()) for i in range(2)]

    wb.wait_for(lambda: all(abs(a - b) < 1e-3 for a, b in zip(sliders(), expect, strict=True)),
                what=f"Tune sliders to take trial {best.number}'s weights {expect}")
