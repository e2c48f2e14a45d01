"""The workbench controller (workbench.session) on a tiny random pool: tune, presets, search, chat, export."""

from __future__ import annotations

import gc
import json
import os
import re
import time
import weakref
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer, perturbed

from optimer_lib.checkpoints.vectors import extract_vector, save_vector
from optimer_lib.scoring.evaluate import EvalSuite
from workbench.chatting import GenSettings, prompt_ids
from workbench.searching import SearchSpec, best_params, load_study, study_names
from workbench.session import BASE, BEST, TUNE, Session
from workbench.workspace import WorkbenchError, Workspace

torch.set_num_threads(1)
SUITE = EvalSuite(texts={"en": ["the quick brown fox jumps over the lazy dog"] * 3,
                         "ja": ["日本語のテキスト 日本語のテキスト"] * 3},
                  qa={"math": [("Question: What is 12 + 35?\nAnswer:", "47")] * 2})


def tiny_workdir(root: Path, names: tuple[str, ...] = ("ja", "math")) -> Path:
    """A workdir with a tiny llama base, one vector per name, an instruction vector and workbench.json."""
    tok = make_tokenizer()
    base = make_model("llama")
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    files = []
    for i, name in enumerate([*names, "instruct"]):
        tuned = perturbed(base, 0.05, seed=10 + i)
        vec = extract_vector(base, tuned, name=name, source=f"cpt/{name}", tokens_trained=1000 * (i + 1))
        files.append(save_vector(vec, root / "vectors" / f"{name}.safetensors"))
    Workspace(root).write_manifest(base_dir, files[:-1], files[-1])
    return root


@pytest.fixture
def session(tmp_path: Path) -> Session:
    return Session(Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE), tune_limit=3, qa_limit=2)


def test_pool_is_read_from_manifest_and_shared(session: Session):
    sh = session.shared
    assert sh.names == ["ja", "math"] and sh.instruction is not None
    rows = sh.vector_rows()
    assert [r["name"] for r in rows] == ["ja", "math", "instruct"]
    assert rows[0]["tokens"] == "1000" and rows[0]["norm"] > 0
    names, cos = sh.cosines()
    assert names == ["ja", "math"] and abs(cos[0][0] - 1) < 1e-6
    other = Session(session.workspace)
    assert other.shared is sh and other.shared.engine is sh.engine  # one pool and one engine per workspace
    with other.merged() as model:                                   # sessions hold weights; models are lent
        assert model.model.embed_tokens.weight.data_ptr() != sh.model.model.embed_tokens.weight.data_ptr()


def test_apply_merges_in_place_and_scores(session: Session):
    r0 = session.apply({"ja": 0.0, "math": 0.0})
    base_emb = session.shared.model.model.embed_tokens.weight.clone()
    r1 = session.apply({"ja": 1.0}, instruction_weight=0.5)      # missing names get 0
    assert set(r1.metrics) == {"loss:en", "loss:ja", "acc:math"}
    assert r1.metrics["loss:en"] != r0.metrics["loss:en"]
    assert r1.weights == {"ja": 1.0, "math": 0.0} and r1.instruction_weight == 0.5
    assert r1.merge_s >= 0 and r1.score_s > 0 and r1.objective is not None
    ja = session.shared.vectors[0].tensors["model.embed_tokens.weight"]
    inst = session.shared.instruction.tensors["model.embed_tokens.weight"]
    with session.merged() as model:
        torch.testing.assert_close(model.model.embed_tokens.weight, base_emb + ja + 0.5 * inst)
    torch.testing.assert_close(session.shared.model.model.embed_tokens.weight, base_emb)  # shared base untouched
    with pytest.raises(WorkbenchError, match="unknown vector"):
        session.apply({"xx": 1.0})


def test_sessions_are_independent(session: Session):
    other = Session(session.workspace, tune_limit=3, qa_limit=2)
    session.apply({"ja": 1.0, "math": 1.0})
    other.apply({"ja": 0.0, "math": 0.0})
    assert session.tune.weights == {"ja": 1.0, "math": 1.0}
    assert other.pane_weights(TUNE)[0] == {"ja": 0.0, "math": 0.0}


def test_presets_and_references(session: Session):
    assert session.preset("zeros") == {"ja": 0.0, "math": 0.0}
    assert session.preset("average") == {"ja": 0.5, "math": 0.5}
    with pytest.raises(WorkbenchError, match="no search result"):
        session.preset("best")
    assert session.reference("best") is None
    base = session.reference("base")
    assert base == session.reference("base")                    # cached in the shared pool
    assert base != session.reference("average")


def test_search_runs_in_background_and_is_watchable(session: Session):
    events = []
    run = session.start_search(SearchSpec(trials=4, sampler="random", search_limit=2, top_k=0, study_name="t1"))
    run.on_event = events.append
    assert run.wait(60), "search did not finish"
    assert run.error is None and run.result is not None and len(run.events) == 4
    assert [e.number for e in run.events] == [0, 1, 2, 3]
    assert "t1" in study_names(session.workspace.storage_url)
    study = load_study(session.workspace.storage_url, "t1")
    assert len(study.trials) == 4
    assert session.preset("best") == run.result.best_weights == best_params(study, ["ja", "math"])
    assert session.reference("best") is not None
    assert json.loads(run.result.path.read_text())["trials"] == 4
    assert "done" in run.status()


def test_search_stop_keeps_finished_trials(session: Session):
    run = session.start_search(SearchSpec(trials=500, sampler="random", search_limit=2, study_name="t2"))
    deadline = time.time() + 60
    while len(run.events) < 2 and time.time() < deadline:
        time.sleep(0.05)
    run.stop()
    assert run.wait(30)
    assert run.stopped and run.error is None
    n = len(load_study(session.workspace.storage_url, "t2").get_trials(states=(__import__("optuna").trial.
                                                                                  TrialState.COMPLETE,)))
    assert 2 <= n < 500
    assert session.best_weights() is not None
    # the stopped run still writes its best finished trial (its merger's last lease is cancelled too)
    assert run.result is not None and run.result.interrupted, run.status()
    best = json.loads(run.result.path.read_text())
    assert best["interrupted"] is True and best["weights"] == run.result.best_weights
    assert "best.json in" in run.status()


SLOW_OBJECTIVE = """
import pathlib
import torch

def score(model, tokenizer):
    pathlib.Path(__file__).with_name("trial-started").touch()
    ids = torch.tensor([[1, 5, 9, 14]])
    for _ in range(100_000):  # ~100 s of forward passes on the tiny model: a long trial of a real model
        model(input_ids=ids)
    return 0.0
"""


def test_stop_abandons_the_running_trial_within_a_forward_pass(session: Session):
    """Stop takes effect at the running trial's next forward pass or block (the engine lease's cancel check), not
    when the trial ends; the trial is marked interrupted, as Ctrl-C marks it."""
    from optimer_lib.search import record

    wd = session.workspace.workdir
    (wd / "slow.py").write_text(SLOW_OBJECTIVE)
    run = session.start_search(SearchSpec(trials=3, sampler="random", objective="slow.py:score", top_k=0,
                                          study_name="t-stop"))
    deadline = time.time() + 60
    while not (wd / "trial-started").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert run.running, run.status()
    t0 = time.monotonic()
    run.stop()
    assert run.wait(10), "Stop waited for the running trial"
    assert time.monotonic() - t0 < 10 and run.stopped and run.error is None, run.status()
    trials = load_study(session.workspace.storage_url, "t-stop").trials
    assert len(trials) == 1 and trials[0].user_attrs.get(record.INTERRUPTED)
    with session.merged() as model:  # the search's lease ended: the engine lends slots again
        model(input_ids=torch.tensor([[1, 5]]))


NICE_OBJECTIVE = """
import os
import pathlib
import threading

def score(model, tokenizer):
    nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    pathlib.Path(__file__).with_name("trial-nice").write_text(str(nice))
    return 0.0
"""


def test_a_search_runs_its_trials_at_compute_priority(session: Session, monkeypatch):
    """A search's trials merge and score in its own thread, which yields the cores to the web server's threads
    (optimer_lib.engine.priority); the value is asked one above this process's, so the test can fail anywhere."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    if before >= 19:
        pytest.skip(f"this test process already runs at nice {before}: no lower priority to check")
    monkeypatch.setenv("OPTIMER_COMPUTE_NICE", str(before + 1))
    wd = session.workspace.workdir
    (wd / "nice.py").write_text(NICE_OBJECTIVE)
    run = session.start_search(SearchSpec(trials=1, sampler="random", objective="nice.py:score", top_k=0,
                                          study_name="t-nice"))
    assert run.wait(60) and run.error is None, run.status()
    assert int((wd / "trial-nice").read_text()) == before + 1


def test_the_stop_button_answers_with_the_stopped_status(session: Session):
    """The Search tab's Stop handler waits the moment Stop takes and returns the run's final status, and makes the
    next poll redraw it: its reply must not leave "stopping…" over a "stopped" the poll drew first."""
    from workbench.tabs.search import SearchTab

    run = session.start_search(SearchSpec(trials=500, sampler="random", search_limit=2, study_name="t-button"))
    deadline = time.time() + 60
    while not run.events and time.time() < deadline:
        time.sleep(0.05)
    session.ui["search_sig"] = ("a status the poll drew",)
    text = SearchTab.on_stop(object.__new__(SearchTab), session)  # the handler uses only the session
    assert text.startswith("stopped `t-button` after") and text == run.status()
    assert "search_sig" not in session.ui
    n, noun = re.search(r"after ([\d,]+) (trials?)\b", text).groups()
    assert noun == ("trial" if n == "1" else "trials"), text  # "after 1 trial", never "after 1 trials"


def test_counts_are_worded_in_the_right_number():
    from workbench.text import counted

    assert [counted(n, "trial") for n in (0, 1, 2, 1500)] == ["0 trials", "1 trial", "2 trials", "1,500 trials"]
    assert counted(1, "scored merge") == "1 scored merge" and counted(1, "query", "queries") == "1 query"
    assert counted(3, "query", "queries") == "3 queries"


def test_chat_runs_while_a_search_runs(session: Session):
    run = session.start_search(SearchSpec(trials=500, sampler="random", search_limit=2, study_name="t3"))
    try:
        final = list(session.chat("fox", [BASE, TUNE], settings=GenSettings(max_new_tokens=4, greedy=True)))[-1]
        assert all(h[-1]["content"] for h in final) and run.running
    finally:
        run.stop()
        run.wait(30)


def test_search_settings_are_checked_up_front(session: Session):
    with pytest.raises(Exception, match="unknown sampler"):
        session.start_search(SearchSpec(sampler="nope"))
    with pytest.raises(Exception, match="bad --objective|unknown objective"):
        session.start_search(SearchSpec(objective="loss:xx"))
    with pytest.raises(WorkbenchError, match="outside the workdir"):
        session.start_search(SearchSpec(objective="/tmp/evil.py:score"))


def test_chat_streams_every_pane(session: Session):
    session.apply({"ja": 0.3, "math": 0.1}, instruction_weight=1.0)
    settings = GenSettings(max_new_tokens=5, greedy=True)
    frames = list(session.chat("the quick", [BASE, TUNE], settings=settings))
    assert len(frames) > 2                                      # streamed, not one final frame
    final = frames[-1]
    assert [m["role"] for m in final[0]] == ["user", "assistant"]
    assert all(m[-1]["content"] for m in final), final
    again = list(session.chat("fox", [BASE, TUNE], final, settings))[-1]
    assert len(again[0]) == 4
    bad = list(session.chat("x", [BEST, BASE], settings=settings))[-1]  # no search yet: that pane says why
    assert bad[0][-1]["content"].startswith("[WorkbenchError") and bad[1][-1]["content"]
    assert session.tune.weights == {"ja": 0.3, "math": 0.1}     # chat never touches the Tune model


def test_prompt_building_and_caps():
    tok = make_tokenizer()
    plain = prompt_ids(tok, [], "the fox", chat=False, max_tokens=100)
    assert plain[0] == tok.bos_token_id
    chat = prompt_ids(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "fox",
                      chat=True, max_tokens=100)
    assert "assistant: " in tok.decode(chat)
    assert len(prompt_ids(tok, [], "the fox " * 50, chat=False, max_tokens=7)) == 7
    s = GenSettings(max_new_tokens=10_000, max_prompt_tokens=10_000).capped(64)
    assert s.max_new_tokens == 32 and s.max_prompt_tokens == 32


def test_export_writes_loadable_checkpoint_and_zip(session: Session):
    from transformers import AutoModelForCausalLM

    session.apply({"ja": 0.25, "math": 0.5}, instruction_weight=1.0)
    res = session.export("m1")
    assert res.path == session.workspace.workdir / "exports" / "m1"
    assert "| ja |" in res.card and (res.path / "mergekit.yaml").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(res.path)
    exact = session.shared.engine.exact(session.state)  # a fresh merge of the Tune state, from the base
    for name, q in loaded.state_dict().items():
        torch.testing.assert_close(exact[name], q, msg=name)
    with zipfile.ZipFile(res.zip_path) as z:
        assert "m1/config.json" in z.namelist()
    with pytest.raises(WorkbenchError, match='exports/m1 already exists: choose another name, or tick "replace an '
                       'existing export"'):  # the tab's words, not the CLI's --force
        session.export("m1")
    with pytest.raises(WorkbenchError, match="bad export name"):
        session.export("../x")


def test_workspace_paths_and_adding_vectors(tmp_path: Path):
    wd = tiny_workdir(tmp_path / "wd")
    ws = Workspace(wd, suite=SUITE)
    with pytest.raises(WorkbenchError, match="outside the workdir"):
        ws.resolve("../elsewhere")
    with pytest.raises(WorkbenchError, match="outside the workdir"):
        ws.add_vector("/etc")
    (wd / "legal.jsonl").write_text('{"text": "a corpus, not a vector"}\n')
    with pytest.raises(WorkbenchError, match="'legal.jsonl' is not a vector: give a checkpoint directory or a "
                                             ".safetensors vector file"):
        ws.add_vector("legal.jsonl")
    base = make_model("llama")
    perturbed(base, 0.05, seed=99).save_pretrained(wd / "cpt" / "code")
    shared = ws.add_vector("cpt/code")
    assert shared.names == ["ja", "math", "code"] and (wd / "vectors" / "code.safetensors").is_file()
    manifest = json.loads((wd / "workbench.json").read_text())  # entries stay relative to the workdir, not the cwd
    assert manifest["vectors"] == ["vectors/ja.safetensors", "vectors/math.safetensors", "vectors/code.safetensors"]
    assert manifest["base"] == "base" and manifest["instruction"] == "vectors/instruct.safetensors"
    assert Workspace(wd, suite=SUITE).pool().names == ["ja", "math", "code"]  # a restart opens the same pool
    assert ws.pool() is shared
    s = Session(ws)
    assert s.names == ["ja", "math", "code"]
    assert wd / "base" in ws.base_candidates()
    # choosing another instruction vector: the old one becomes a plain file, the pool is reopened
    new = ws.set_pool(wd / "base", [wd / "vectors" / "ja.safetensors"], wd / "vectors" / "math.safetensors")
    assert new.names == ["ja"] and new.instruction.name == "math"
    assert s.use_pool() is new and s.names == ["ja"]


def test_a_replaced_pool_is_freed_and_idle_sessions_move_on(session: Session):
    """Sessions hold their pool weakly: when one session opens another pool, the old engine (its base, slots and
    vectors) is freed at once, not when every other open tab reloads. An idle session then moves to the new pool:
    silently, weights kept, when only the dev suite changed; with one "reload" error when the vectors changed."""
    ws, wd = session.workspace, session.workspace.workdir
    idle = Session(ws, tune_limit=3, qa_limit=2)
    idle.apply({"ja": 0.5})
    run = idle.start_search(SearchSpec(trials=2, sampler="random", search_limit=2, top_k=0, study_name="held"))
    assert run.wait(120) and run.error is None
    (wd / "legal.txt").write_text("a legal text\n\nanother legal text\n")
    session.use_pool(ws.add_eval("legal", "legal.txt"))        # a suite change: same engine
    assert "loss:legal" in idle.apply({"ja": 0.5}).metrics and idle.tune.weights == {"ja": 0.5, "math": 0.0}
    old = weakref.ref(idle.shared.engine)
    session.use_pool(ws.set_pool(wd / "base", [wd / "vectors" / "ja.safetensors"], None))
    gc.disable()  # freed by reference counting, not by a later collector pass
    try:
        assert old() is None
    finally:
        gc.enable()
    for _ in range(2):  # until the page reloads (a new Session) or picks a pool: its sliders show old vectors
        with pytest.raises(WorkbenchError, match="reload this page"):
            _ = idle.names
    assert idle.use_pool() is ws.pool() and idle.names == ["ja"] and idle.tune.weights == {"ja": 0.0}
    assert not run.ran_on(idle.shared)
    with pytest.raises(WorkbenchError, match="was replaced"):
        _ = run.shared


def test_workspace_without_pool(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OPTIMER_ASSETS", str(tmp_path / "no-assets"))
    ws = Workspace(tmp_path / "empty")
    assert not ws.has_pool()
    with pytest.raises(WorkbenchError, match="no pool"):
        ws.pool()
    with pytest.raises(WorkbenchError, match="embedded world is missing"):
        ws.build_demo_pool(quick=True)


def test_build_demo_pool_opens_and_saves_the_pool(tmp_path: Path, monkeypatch):
    import optimer_lib.demo

    src = tiny_workdir(tmp_path / "src")
    monkeypatch.setenv("OPTIMER_ASSETS", str(src))                # assets/base = the tiny base
    seen = {}

    def fake_build_pool(cfg):
        seen["tokens"] = cfg.cpt_tokens
        return [src / "vectors" / "ja.safetensors", src / "vectors" / "math.safetensors"], \
            src / "vectors" / "instruct.safetensors"

    monkeypatch.setattr(optimer_lib.demo, "build_pool", fake_build_pool)
    ws = Workspace(tmp_path / "fresh", suite=SUITE)
    assert not ws.has_pool()
    shared = ws.build_demo_pool(quick=True)
    assert seen["tokens"] == optimer_lib.demo.DemoConfig.quick().cpt_tokens
    assert shared.names == ["ja", "math"] and shared.instruction.name == "instruct"
    assert ws.has_pool() and json.loads((tmp_path / "fresh" / "workbench.json").read_text())["instruction"]


def test_norms_and_scoring_cost_are_computed_once_per_pool_and_suite(session: Session, monkeypatch):
    """A page load shows both: computing them per page made 20 simultaneous first pages take seconds."""
    from optimer_lib.checkpoints.vectors import DistributionVector
    from optimer_lib.scoring.tune_config import TuneScoring

    calls = {"norm": 0, "tokens": 0}
    norm, tokens = DistributionVector.norm, TuneScoring.tokens
    monkeypatch.setattr(DistributionVector, "norm", lambda v: calls.__setitem__("norm", calls["norm"] + 1) or norm(v))
    monkeypatch.setattr(TuneScoring, "tokens",
                        lambda sc, *a, **k: calls.__setitem__("tokens", calls["tokens"] + 1) or tokens(sc, *a, **k))
    sh = session.shared
    first = sh.vector_rows()
    assert sh.vector_rows() == first and calls["norm"] == 3  # ja, math, instruct: once each
    line = session.scoring_cost()
    other = Session(session.workspace, tune_limit=3, qa_limit=2)
    assert other.scoring_cost() == line and calls["tokens"] == 1  # the same set on the same suite: read once
    session.set_scoring(docs=1, qa_items=1)
    fewer = session.scoring_cost()
    assert calls["tokens"] == 2 and fewer != line
    extra = session.workspace.workdir / "legal.txt"
    extra.write_text("a contract between the parties shall be binding\n" * 4)
    session.workspace.add_eval("legal", extra)  # a new suite: the same scoring set reads more tokens
    session.use_pool(session.workspace.pool())
    other.use_pool(session.workspace.pool())
    assert other.scoring_cost() != line and calls["tokens"] == 3


def test_study_lookups_read_one_study_not_every_trial(tmp_path: Path, monkeypatch):
    """The page load and polls look studies up by name and read the best trial with one query each: newest created
    first, None for a missing name or file, and a best trial with other parameters (another pool's, or per-group
    weights) falls back to the best trial whose parameters are the pool's vectors."""
    import optuna

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    assert study_names(url) == [] and load_study(url, "a") is None  # no file yet: nothing, and no file made
    assert not (tmp_path / "studies.db").exists()
    for name in ("first", "second"):
        optuna.create_study(storage=url, study_name=name)
    assert study_names(url) == ["second", "first"]
    assert load_study(url, "missing") is None and load_study(url, "") is None
    study = load_study(url, "first")
    assert best_params(study, ["ja", "math"]) is None  # no complete trial
    dist = optuna.distributions.FloatDistribution(0, 1)
    for value, params in ((0.5, {"ja": 0.2, "math": 0.7}), (0.4, {"ja": 0.9, "math": 0.1}), (0.1, {"ja": 0.3})):
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dict.fromkeys(params, dist),
                                                  value=value))
    assert best_params(study, ["ja", "math"]) == {"ja": 0.9, "math": 0.1}  # trial 2 (value 0.1) lacks 'math'
    assert best_params(study, ["ja"]) == {"ja": 0.3}
    (tmp_path / "garbage.db").write_text("not a database")
    for bad in (f"sqlite:///{tmp_path / 'garbage.db'}", "bogus://x"):  # shown as a message, never a traceback
        with pytest.raises(WorkbenchError, match="cannot read Optuna storage"):
            load_study(bad, "s")
    monkeypatch.setattr(optuna.Study, "get_trials", lambda *a, **k: pytest.fail("read every trial"))
    assert best_params(study, ["ja"]) == {"ja": 0.3}  # the best trial fits: no scan
    monkeypatch.setattr(optuna, "get_all_study_summaries", lambda *a, **k: pytest.fail("read every trial"))
    assert study_names(url) == ["second", "first"] and load_study(url, "second").study_name == "second"
