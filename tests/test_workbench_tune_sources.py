"""What a Tune move scores besides the embedded dev sets: a user's own corpus (Pool tab, workbench.json ``eval``)
and an lm-eval task (Tune scoring set), on tiny models, offline. Every number is checked against an independent
scoring of the same merged model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from helpers import require
from test_workbench_session import tiny_workdir
from test_workbench_tuning import SUITE

from optimer_lib.data import embedded_corpora
from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite
from workbench.figures import tune_chart
from workbench.session import Session
from workbench.tabs.tune import dev_sets_update
from workbench.workspace import MANIFEST, WorkbenchError, Workspace

LEGAL = ["the court finds for the plaintiff", "the contract is void", "a lease of land for ten years",
         "the tenant shall pay rent"]


def write_corpus(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(lines.encode()))
    else:
        path.write_text(lines)
    return path


def manifest_eval(root: Path) -> list[str] | None:
    return json.loads((root / MANIFEST).read_text())["eval"]


def test_a_user_corpus_joins_the_suite_and_is_scored_in_tune(tmp_path, monkeypatch):
    root = tiny_workdir(tmp_path / "wd")
    write_corpus(root / "data" / "legal.jsonl", LEGAL)
    ws = Workspace(root, suite=SUITE)
    s = Session(ws, tune_limit=3, qa_limit=2)
    before = s.apply({"ja": 0.5})
    engine = ws.pool().engine
    shared = ws.add_eval("legal", "data/legal.jsonl")
    s.use_pool(shared)
    assert shared.engine is engine and s.tune.weights == {"ja": 0.5, "math": 0.0}  # models kept, weights too
    assert shared.suite.names() == ["en", "ja", "math", "legal"] and manifest_eval(root) == ["legal=data/legal.jsonl"]
    ups = list(s.score_stream({"ja": 0.5}))
    final = ups[-1]
    assert final.phase == "final" and final.sets_done[-2:] == ["legal", "math (QA)"]
    with s.merged() as model:
        ref = evaluate_suite(model, shared.tokenizer, EvalSuite(texts={"legal": LEGAL}), limit=3, seq_len=128)
    assert final.metrics["loss:legal"] == pytest.approx(ref["loss:legal"], rel=1e-6)
    assert final.metrics["loss:ja"] == pytest.approx(before.metrics["loss:ja"], rel=1e-6)  # the old sets unchanged
    assert final.intervals["loss:legal"].contains(final.metrics["loss:legal"])
    monkeypatch.chdir(tmp_path)  # the manifest's path is relative to the workdir, not to the current directory
    again = Workspace(root, suite=SUITE).pool()
    assert again.suite.texts["legal"] == LEGAL and again.suite.names() == shared.suite.names()


def test_added_corpora_keep_the_embedded_sets_and_old_manifests_replace_them(tmp_path):
    embedded = embedded_corpora()
    if not embedded:
        pytest.fail("the embedded corpora are missing: build them (python -m optimer_lib.assets build)")
    root = tiny_workdir(tmp_path / "wd")
    write_corpus(root / "data" / "legal.jsonl.gz", LEGAL)
    (root / "data" / "notes.txt").write_text("first note\nstill the first\n\nsecond note\n\n\nthird note\n")
    ws = Workspace(root)
    assert ws.pool().suite.names() == embedded  # no eval: every embedded corpus
    ws.add_eval("legal", "data/legal.jsonl.gz")
    suite = ws.add_eval("notes", str(root / "data" / "notes.txt")).suite
    assert manifest_eval(root) == [*embedded, "legal=data/legal.jsonl.gz", "notes=data/notes.txt"]
    assert suite.names() == [*embedded, "legal", "notes"]
    assert suite.texts["notes"] == ["first note\nstill the first", "second note", "third note"]
    assert ws.remove_eval("legal").suite.names() == [*embedded, "notes"]
    assert manifest_eval(root) == [*embedded, "notes=data/notes.txt"]
    assert ws.remove_eval("notes").suite.names() == embedded and manifest_eval(root) is None  # the default again
    m = ws.manifest()  # an older manifest naming only a file: that file is the whole suite, as before
    ws.write_manifest(m["base"], m["vectors"], m["instruction"], ["legal=data/legal.jsonl.gz"])
    old = Workspace(root)
    assert old.pool().suite.names() == ["legal"] and old.user_evals() == {"legal": "data/legal.jsonl.gz"}
    assert old.remove_eval("legal").suite.names() == embedded and manifest_eval(root) is None  # not an empty suite


def test_a_removed_corpus_leaves_the_suite_the_manifest_and_tune(tmp_path):
    root = tiny_workdir(tmp_path / "wd")
    write_corpus(root / "data" / "legal.jsonl", LEGAL)
    ws = Workspace(root, suite=SUITE)
    s = Session(ws, tune_limit=3, qa_limit=2)
    engine = ws.pool().engine
    s.use_pool(ws.add_eval("legal", "data/legal.jsonl"))
    s.set_scoring(["ja", "legal"], docs=3, qa_items=2)
    before = s.apply({"ja": 0.5})
    assert sorted(before.metrics) == ["loss:ja", "loss:legal"] and ws.user_evals() == {"legal": "data/legal.jsonl"}
    shared = ws.remove_eval("legal")
    s.use_pool(shared)  # the removed set leaves the scoring set (a notebook's Session, or any page's)
    assert shared.engine is engine and s.tune.weights == {"ja": 0.5, "math": 0.0}  # models and weights kept
    assert shared.suite.names() == ["en", "ja", "math"] and manifest_eval(root) is None and ws.user_evals() == {}
    assert s.scoring.sets == ("ja",) and (root / "data" / "legal.jsonl").is_file()  # the file stays
    shown = dev_sets_update(s, ["ja", "legal"])  # the Tune tab's dev-set boxes when its scoring set opens
    assert (shown["choices"], shown["value"]) == (["en", "ja", "math"], ["ja"])
    after = list(s.score_stream({"ja": 0.5}))[-1]
    assert not after.cached and after.sets_done == ["ja"]  # scored afresh, on the suite without legal
    assert after.metrics == {"loss:ja": pytest.approx(before.metrics["loss:ja"], rel=1e-6)}
    assert Workspace(root, suite=SUITE).pool().suite.names() == ["en", "ja", "math"]  # as workbench.json says

    s.use_pool(ws.add_eval("legal", "data/legal.jsonl"))
    s.set_scoring(["legal"])
    s.use_pool(ws.remove_eval("legal"))
    assert s.scoring.sets is None and s.scoring.docs == 8  # nothing named is left: every set, the rest kept
    for name, words in {"ja": "'ja' is a built-in dev set", "legal": "no added dev corpus 'legal'",
                        "": "the added ones are none"}.items():
        with pytest.raises(WorkbenchError, match=words) as info:
            ws.remove_eval(name)
        assert "\n" not in str(info.value)


def test_bad_dev_corpora_are_refused_in_one_line(tmp_path):
    root = tiny_workdir(tmp_path / "wd")
    write_corpus(root / "data" / "legal.jsonl", LEGAL)
    write_corpus(tmp_path / "outside.jsonl", LEGAL)
    (root / "data" / "table.csv").write_text("a,b\n1,2\n")
    (root / "data" / "empty.txt").write_text("\n\n")
    (root / "data" / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    ws = Workspace(root, suite=SUITE)
    cases = {("legal", "../outside.jsonl"): "outside the workdir",
             ("legal", str(tmp_path / "outside.jsonl")): "outside the workdir",
             ("legal", "data/table.csv"): "give a .txt or .jsonl file",
             ("legal", "data/missing.jsonl"): "does not exist",
             ("ja", "data/legal.jsonl"): "has a dev set 'ja' already",
             ("le gal", "data/legal.jsonl"): "not usable as metric names",
             ("", "data/legal.jsonl"): "no name given",
             ("empty", "data/empty.txt"): "is empty",
             ("bad", "data/bad.jsonl"): "expected a JSON object with a 'text' field"}
    for (name, path), words in cases.items():
        with pytest.raises(WorkbenchError, match=words) as info:
            ws.add_eval(name, path)
        assert "\n" not in str(info.value)
    assert manifest_eval(root) is None and ws.pool().suite is SUITE  # nothing changed


def test_an_lmeval_task_is_scored_after_the_dev_sets_and_cached_per_merge(tmp_path):
    require("lm_eval")
    from test_lmeval import LL_DOCS, LL_YAML, reference_ppl, write_task

    root = tiny_workdir(tmp_path / "wd")
    write_task(root / "tasks", "tiny_ll", LL_YAML, LL_DOCS)
    ws = Workspace(root, suite=SUITE.select(texts=["en", "ja"], qa=[]))
    s = Session(ws)
    sc = s.set_scoring(docs=4, seq_len=32, batch_size=4, lmeval=["tasks/tiny_ll.yaml"])
    assert sc.lmeval == (f"lmeval:{root / 'tasks' / 'tiny_ll.yaml'}",)
    assert "+ lm-eval tiny_ll on 4 documents each" in s.scoring_cost()
    key = "lmeval:tiny_ll:perplexity"
    values = {}
    for a in (0.0, 1.0):
        ups = list(s.score_stream({"ja": a, "math": a}))
        assert ups[0].phase == ("scoring" if a == 0.0 else "estimate")  # an estimate once a merge was scored
        assert [u.phase for u in ups[1:]] == ["partial", "partial", "final"]
        assert ups[-2].sets_done == ["en", "ja"] and key not in ups[-2].metrics  # dev sets shown before lm-eval
        final = ups[-1]
        assert final.sets_done == ["en", "ja", key] and final.lmeval_s[key] > 0 and key not in final.intervals
        with s.merged() as model:
            assert final.metrics[key] == pytest.approx(reference_ppl(model, ws.pool().tokenizer, LL_DOCS[:4]),
                                                       rel=1e-4)
        values[a] = final.metrics[key]
    assert abs(values[1.0] - values[0.0]) > 1e-3 * values[0.0]  # the task sees the merge's weights
    other = Session(ws)
    other.set_scoring(docs=4, seq_len=32, batch_size=4, lmeval=["tasks/tiny_ll.yaml"])
    hit = list(other.score_stream({"ja": 1.0, "math": 1.0}))
    assert [u.phase for u in hit] == ["final"] and hit[0].cached and hit[0].metrics[key] == values[1.0]
    bars = {x for t in tune_chart(hit[0].metrics, {}).data for x in t.x}
    assert "tiny_ll:perplexity" in bars and "en" in bars
    assert s.last.lmeval_s[key] > 0


def test_lmeval_terms_outside_the_workdir_or_unknown_are_refused(tmp_path):
    require("lm_eval")
    from test_lmeval import LL_DOCS, LL_YAML, write_task

    root = tiny_workdir(tmp_path / "wd")
    write_task(tmp_path / "elsewhere", "tiny_ll", LL_YAML, LL_DOCS)
    write_task(root / "tasks", "tiny_ll", LL_YAML, LL_DOCS)
    s = Session(Workspace(root, suite=SUITE))
    cases = {"../elsewhere/tiny_ll.yaml": "outside the workdir",
             str(tmp_path / "elsewhere" / "tiny_ll.yaml"): "outside the workdir",
             "tasks/missing.yaml": "does not exist",
             "tasks/tiny_ll.yaml:acc": "has no metric 'acc'"}
    for term, words in cases.items():
        with pytest.raises(WorkbenchError, match=words) as info:
            s.set_scoring(lmeval=[term])
        assert "\n" not in str(info.value)
    assert s.scoring.lmeval == ()  # the scoring set in use did not change


@pytest.mark.slow  # lm-eval indexes every task it ships (about 15 s on 2 cores)
def test_an_unknown_lmeval_task_name_is_refused(tmp_path):
    require("lm_eval")
    s = Session(Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE))
    with pytest.raises(WorkbenchError, match="unknown lm-eval task 'no_such_task_xyz'") as info:
        s.set_scoring(lmeval=["no_such_task_xyz"])
    assert "\n" not in str(info.value) and s.scoring.lmeval == ()
