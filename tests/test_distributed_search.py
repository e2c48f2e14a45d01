"""Several ``optimer search`` workers on one study: exact total, no duplicates, no losses; storages.

Semantics under test: ``--trials N`` is the *study's* total, also with several workers: each worker
stops once the study holds N trials finished or running, so two workers with ``--trials N`` end with
exactly N counted trials between them (not 2N).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import optuna
import pytest
from helpers import FakeMerger
from optuna.trial import TrialState
from test_search import SUITE, config, quadratic

from optimer_lib.scoring.objectives import Objective
from optimer_lib.search import trials
from optimer_lib.search.storage import open_storage
from optimer_lib.search.study import run_search
from optimer_lib.search.trials import counted

OBJECTIVE = '''
import os, time, pathlib
READY = pathlib.Path(os.environ["WORKERS_DIR"])
(READY / f"ready-{os.getpid()}").touch()          # at import, i.e. when the worker parses --objective


def slow(model, tokenizer):
    deadline = time.time() + 60                   # start trials only once both workers are up
    while len(list(READY.glob("ready-*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    return float(sum(p.detach().float().abs().sum() for p in model.parameters()))
'''


# ~11 s each (two CLI worker processes): the Pareto variant runs with the slow tests (make test-slow; CI runs it)
@pytest.mark.parametrize("pareto", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["single", "pareto"])
def test_two_workers_complete_exactly_n_trials(tmp_path, tiny_vectors, pareto):
    """Both the single-objective and the Pareto search claim slots through the one trial loop."""
    base, vecs = tiny_vectors()
    (tmp_path / "obj.py").write_text(OBJECTIVE)
    (tmp_path / "workers").mkdir()
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i}" for i in range(20)))
    storage, n = f"sqlite:///{tmp_path / 'study.db'}", 12
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORKERS_DIR": str(tmp_path / "workers")}
    slow = f"{tmp_path / 'obj.py'}:slow"
    objective = ["--objectives", slow, "loss:notes"] if pareto else ["--objective", slow]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "optimer_lib.cli", "search", "--base", base, "--vector", vecs[0], "--vector", vecs[1],
         "--eval", f"notes={corpus}", *objective, "--trials", str(n),
         "--storage", storage, "--study", "shared", "--seed", str(seed), "--top-k", "0", "--sampler", "random",
         "--workdir", tmp_path / f"w{seed}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for seed in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        assert ("front" if pareto else "best_weights") in json.loads(out)
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # no duplicate or missing numbers
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # nothing left hanging
    assert counted(study) == n  # exactly the study's total, between both workers
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == n and all(t.user_attrs.get("weights") for t in done)  # no losses
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both workers contributed
    # each worker wrote its best.json; the one that finished last saw the whole study
    result = "pareto.json" if pareto else "best.json"
    assert max(json.loads((tmp_path / f"w{s}" / result).read_text())["trials"] for s in (0, 1)) == n


def test_running_trials_of_live_workers_hold_slots_and_dead_ones_are_freed(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    study = optuna.create_study(storage=storage, study_name="optimer")
    live_trial, dead_trial = study.ask(), study.ask()
    live_trial.set_user_attr("worker", f"{host}:{os.getppid()}")  # alive: holds its slot
    dead_trial.set_user_attr("worker", f"{host}:{dead.pid}")      # killed: its slot is freed
    obj = Objective(fn=quadratic, spec="quadratic")
    res = run_search(FakeMerger(), None, SUITE, obj, config(tmp_path, trials=4, storage=storage, sampler="random"),
                     progress=False)
    assert res.new_trials == 3  # 4 - the live worker's running trial
    frozen = res.study.get_trials(deepcopy=False)
    assert frozen[dead_trial.number].state == TrialState.FAIL and frozen[dead_trial.number].user_attrs["interrupted"]
    assert frozen[live_trial.number].state == TrialState.RUNNING and counted(res.study) == 3



def test_a_trial_killed_before_its_worker_stamp_is_freed_after_the_grace(tmp_path, monkeypatch):
    """A worker SIGKILLed between ``study.ask()`` and stamping the trial leaves it RUNNING with no worker;
    the rerun must not count it for ever (the CI failure: 11 of 12 trials), yet a fresh unstamped trial (a
    live worker's, milliseconds old) holds its slot while the grace runs."""
    monkeypatch.setattr(trials, "UNSTAMPED_GRACE_S", 1.0)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="optimer")
    orphan = study.ask()                                          # killed before it was stamped
    assert trials.claimed(study) == 1                             # within the grace: holds its slot
    obj = Objective(fn=quadratic, spec="quadratic")
    res = run_search(FakeMerger(), None, SUITE, obj, config(tmp_path, trials=4, storage=storage, sampler="random"),
                     progress=False)
    assert res.new_trials == 4 and counted(res.study) == 4
    frozen = res.study.get_trials(deepcopy=False)
    assert frozen[orphan.number].state == TrialState.FAIL and frozen[orphan.number].user_attrs["interrupted"]

def test_journal_storage_url(tmp_path):
    log = tmp_path / "journal.log"
    obj = Objective(fn=quadratic, spec="quadratic")
    res = run_search(FakeMerger(), None, SUITE, obj, config(tmp_path, trials=3, storage=f"journal://{log}",
                                                            sampler="random"), progress=False)
    assert log.is_file() and res.new_trials == 3
    study = optuna.load_study(study_name="optimer", storage=open_storage(f"journal://{log}"))
    assert counted(study) == 3
    assert isinstance(open_storage(f"journal://{log}"), optuna.storages.JournalStorage)


def test_journal_storage_everywhere_a_study_is_read(tmp_path):
    """A journal:// study is read back by rerank, warm start and the workbench like an SQLite one."""
    from optimer_lib.errors import ConfigError
    from optimer_lib.search.rerank import open_study
    from optimer_lib.search.warmstart import warm_start_study
    from workbench.searching import load_study, study_names

    url = f"journal://{tmp_path / 'journal.log'}"
    assert study_names(url) == [] and load_study(url, "optimer") is None  # not written yet: nothing, no error
    try:
        open_study(url)
        raise AssertionError("a missing journal must be a ConfigError")
    except ConfigError as exc:
        assert "no study journal" in str(exc)
    def with_metrics(model, tokenizer):  # records a metric a warm start can re-score
        q = quadratic(model, tokenizer)
        return {"objective": q, "loss:en": q + 1.0}

    run_search(FakeMerger(), None, SUITE, Objective(fn=with_metrics, spec="with_metrics"),
               config(tmp_path, trials=4, storage=url, sampler="random"), progress=False)
    assert len(open_study(url).trials) == 4 and study_names(url) == ["optimer"]
    assert len(load_study(url, "optimer").trials) == 4
    seeded = warm_start_study("optimer", "loss:en", storage=url, study_name="again")
    assert len(seeded.trials) == 4 and min(t.value for t in seeded.trials) >= 1.0
    assert sorted(study_names(url)) == ["again", "optimer"]


def test_a_worker_that_loses_the_table_creation_race_retries(monkeypatch):
    """Workers starting together on a fresh PostgreSQL database race to create Optuna's tables; the loser sees
    ``relation "studies" already exists`` (a ProgrammingError, seen in CI with three workers) and must retry,
    as it does for SQLite's and MySQL's integrity and operational errors."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    from optimer_lib.search import storage as storage_mod

    calls = []
    lost = [ProgrammingError("CREATE TABLE studies", {}, Exception('relation "studies" already exists')),
            IntegrityError("INSERT", {}, Exception("duplicate key")), OperationalError("x", {}, Exception("locked"))]

    def fake_rdb(url, engine_kwargs=None):
        calls.append(url)
        if lost:
            raise lost.pop(0)
        return "storage"

    monkeypatch.setattr(storage_mod.optuna.storages, "RDBStorage", fake_rdb)
    monkeypatch.setattr(storage_mod.time, "sleep", lambda s: None)
    assert open_storage("postgresql://u@h/db") == "storage" and len(calls) == 4
    lost[:] = [ProgrammingError("SELECT", {}, Exception("syntax"))] * 5  # a real error still surfaces, after 5 tries
    with pytest.raises(ProgrammingError):
        open_storage("postgresql://u@h/db")


def test_a_storage_file_in_a_missing_folder_is_refused_in_words(tmp_path):
    """A SQLite or journal file whose folder does not exist: a ConfigError naming the folder, not the driver's
    "unable to open database file" (the arena widget, the Search tab and the CLI all open storages here)."""
    from optimer_lib.errors import ConfigError

    for url in (f"sqlite:///{tmp_path}/nope/arena.db", f"journal://{tmp_path}/nope/study.log"):
        with pytest.raises(ConfigError, match="the folder .*nope' does not exist"):
            open_storage(url)
    assert open_storage(f"sqlite:///{tmp_path}/arena.db") is not None  # the folder is there: opened
