"""lm-evaluation-harness objectives (optional extra ``lmeval``) on tiny random models, fully offline.

Every score is checked against an independent computation: the log-likelihood of each answer given
its prompt, summed from the model's own log-softmax, then the accuracy / perplexity lm-eval defines.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import make_model, perturbed
from helpers import require

require("lm_eval")  # the [lmeval] extra (in the test extra too): a CI error when missing

from optimer_lib.checkpoints.vectors import extract_vector  # noqa: E402
from optimer_lib.errors import ConfigError, DataError, MissingDependencyError  # noqa: E402
from optimer_lib.merging.resident import ResidentMerger  # noqa: E402
from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite  # noqa: E402
from optimer_lib.scoring.lmeval import LMEvalScorer, load_task, split_spec  # noqa: E402
from optimer_lib.scoring.objectives import WeightedTerms, parse_objective  # noqa: E402
from optimer_lib.search.study import SearchConfig, run_search  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lmeval"

# Short prompts: the tiny models have 64 positions.
MC_DOCS = [{"q": f"{a} + {b} =", "choices": [str(a + b + d) for d in (0, 1, -1, 10)][k:] +
            [str(a + b + d) for d in (0, 1, -1, 10)][:k], "label": (4 - k) % 4}
           for k, (a, b) in zip([0, 1, 2, 3, 1, 2, 0, 3, 2, 1, 3, 0],
                                [(12, 35), (7, 8), (21, 4), (33, 33), (9, 90), (14, 6),
                                 (5, 5), (61, 2), (18, 27), (40, 13), (3, 96), (25, 25)], strict=True)]
LL_DOCS = [{"q": d["q"], "a": " " + d["choices"][d["label"]]} for d in MC_DOCS]

MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/{name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
LL_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: data/{name}.jsonl
test_split: train
output_type: loglikelihood
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def write_task(root: Path, name: str, template: str, docs: list[dict]) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    path = root / f"{name}.yaml"
    path.write_text(template.format(name=name))
    return path


@pytest.fixture
def tasks(tmp_path: Path) -> dict[str, Path]:
    """Two local tasks in one directory, data in a subfolder, paths relative to the YAML."""
    root = tmp_path / "tasks"
    return {"mc": write_task(root, "tiny_mc", MC_YAML, MC_DOCS), "ll": write_task(root, "tiny_ll", LL_YAML, LL_DOCS)}


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context): the continuation's tokens are those of the whole after the context's."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    assert whole[:len(ctx)] == ctx
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def reference_mc(model, tokenizer, docs: list[dict]) -> dict[str, float]:
    acc = acc_norm = 0
    for d in docs:
        lls = [loglikelihood(model, tokenizer, d["q"], " " + c) for c in d["choices"]]
        acc += max(range(len(lls)), key=lls.__getitem__) == d["label"]
        norm = [ll / len(c) for ll, c in zip(lls, d["choices"], strict=True)]
        acc_norm += max(range(len(norm)), key=norm.__getitem__) == d["label"]
    return {"acc": acc / len(docs), "acc_norm": acc_norm / len(docs)}


def reference_ppl(model, tokenizer, docs: list[dict]) -> float:
    lls = [loglikelihood(model, tokenizer, d["q"], d["a"]) for d in docs]
    return math.exp(-sum(lls) / len(lls))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_accuracy_matches_an_independent_computation(tasks, tiny_tokenizer, arch):
    scorer = LMEvalScorer()
    task = load_task(str(tasks["mc"]))
    for seed in (0, 1):
        model = make_model(arch, seed=seed)
        got = scorer.evaluate(task, model, tiny_tokenizer)
        want = reference_mc(model, tiny_tokenizer, MC_DOCS)
        assert got == pytest.approx(want), (seed, got, want)
        limited = scorer.evaluate(task, model, tiny_tokenizer, limit=5)  # lm-eval's limit: the first 5 documents
        assert limited == pytest.approx(reference_mc(model, tiny_tokenizer, MC_DOCS[:5]))


def test_in_place_rewrites_are_scored_by_the_same_wrapper(tasks, tiny_tokenizer):
    model, other = make_model("llama", seed=0), make_model("llama", seed=3)
    scorer = LMEvalScorer()
    task = load_task(str(tasks["ll"]))
    first = scorer.evaluate(task, model, tiny_tokenizer)["perplexity"]
    wrapper = scorer.lm(model, tiny_tokenizer)
    assert wrapper.model is model  # a reference, not a copy
    assert first == pytest.approx(reference_ppl(model, tiny_tokenizer, LL_DOCS), rel=1e-6)
    with torch.no_grad():  # what the resident merger does each trial
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            p.copy_(q)
    second = scorer.evaluate(task, model, tiny_tokenizer)["perplexity"]
    assert scorer.lm(model, tiny_tokenizer) is wrapper
    assert second == pytest.approx(reference_ppl(model, tiny_tokenizer, LL_DOCS), rel=1e-6)
    assert abs(second - first) > 1e-3 * first


def test_group_of_local_tasks(tmp_path, tiny_tokenizer):
    """A group YAML (or its directory) whose member tasks read data relative to their own YAMLs."""
    root = tmp_path / "group"
    write_task(root / "a", "mc_a", MC_YAML, MC_DOCS[:6])
    write_task(root / "b", "mc_b", MC_YAML, MC_DOCS[6:])
    (root / "grp.yaml").write_text("group: grp\ntask: [mc_a, mc_b]\naggregate_metric_list:\n"
                                   "  - metric: acc\n    aggregation: mean\n    weight_by_size: true\n")
    model = make_model("llama", seed=1)
    scorer = LMEvalScorer()
    for source in (str(root / "grp.yaml"), str(root), f"{root}/grp"):
        task = load_task(source)
        assert task.name == "grp"
        assert scorer.evaluate(task, model, tiny_tokenizer)["acc"] == \
            pytest.approx(reference_mc(model, tiny_tokenizer, MC_DOCS)["acc"])
        assert scorer.evaluate(task, model, tiny_tokenizer, limit=2)["acc"] == \
            pytest.approx(reference_mc(model, tiny_tokenizer, MC_DOCS[:2] + MC_DOCS[6:8])["acc"])  # 2 per member


def test_spec_forms_and_signs(tasks, tiny_tokenizer):
    assert split_spec("a/b.yaml:acc_norm") == ("a/b.yaml", "acc_norm")
    assert split_spec("a/b.yaml") == ("a/b.yaml", None)
    assert split_spec("gsm8k:exact_match/strict-match") == ("gsm8k", "exact_match/strict-match")
    assert split_spec("C:\\tasks\\b.yaml") == ("C:\\tasks\\b.yaml", None)
    mc, ll = str(tasks["mc"]), str(tasks["ll"])
    root = tasks["mc"].parent
    # a file, DIR/NAME, default metric = the task's first
    for spec, key in [(f"lmeval:{mc}", f"lmeval:{mc}:acc"), (f"lmeval:{mc}:acc_norm", f"lmeval:{mc}:acc_norm"),
                      (f"lmeval:{root}/tiny_ll", f"lmeval:{root}/tiny_ll:perplexity")]:
        obj = parse_objective(spec, ["en"])
        assert isinstance(obj.fn, WeightedTerms) and obj.spec == spec
        assert list(obj.fn.terms) == [key]
    obj = parse_objective(f"lmeval:{mc}:acc=2,lmeval:{ll}=1,loss:en=0.5", ["en"])
    fn = obj.fn
    assert fn.terms == {f"lmeval:{mc}:acc": 2.0, f"lmeval:{ll}:perplexity": 1.0, "loss:en": 0.5}
    assert fn.needed_texts == {"en"} and fn.needed_qa == set()
    metrics = {f"lmeval:{mc}:acc": 0.25, f"lmeval:{ll}:perplexity": 30.0, "loss:en": 4.0}
    assert fn.value(metrics) == pytest.approx((2 * -0.25 + 30.0 + 0.5 * 4.0) / 3.5)  # acc negated, ppl not

    model = make_model("llama", seed=2)
    suite = EvalSuite(texts={"en": ["the quick brown fox", "the lazy dog"], "code": ["def f(x):\n    return x"]})
    value, got = obj.evaluate(model, tiny_tokenizer, suite, limit=6)
    assert "loss:code" not in got  # only the dev sets the objective reads
    want = {f"lmeval:{mc}:acc": reference_mc(model, tiny_tokenizer, MC_DOCS[:6])["acc"],
            f"lmeval:{mc}:acc_norm": reference_mc(model, tiny_tokenizer, MC_DOCS[:6])["acc_norm"],
            f"lmeval:{ll}:perplexity": reference_ppl(model, tiny_tokenizer, LL_DOCS[:6]),
            "loss:en": evaluate_suite(model, tiny_tokenizer, suite.select(texts=["en"]), limit=6)["loss:en"]}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6), k
    assert value == pytest.approx(fn.value(want), rel=1e-6) and got["objective"] == value


def test_run_search_scores_each_trial_on_the_resident_model(tasks, tiny_tokenizer, tmp_path):
    base = make_model("llama", seed=0)
    vectors = [extract_vector(base, perturbed(base, 0.3, seed=10 + i), name=n) for i, n in enumerate(["x", "y"])]
    merger = ResidentMerger(base, vectors)
    ll = str(tasks["ll"])
    obj = parse_objective(f"lmeval:{ll}=1,lmeval:{tasks['mc']}:acc=0.5", [])
    cfg = SearchConfig(workdir=tmp_path, storage=":memory:", trials=3, sampler="random", search_limit=4,
                       rescore_limit=None, top_k=1)
    res = run_search(merger, tiny_tokenizer, EvalSuite(), obj, cfg, progress=False)
    trials = res.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 3
    key = f"lmeval:{ll}:perplexity"
    seen = []
    for t in trials:  # the stored search-fidelity metrics are those of that trial's merge, on 4 documents
        merger.set_weights(t.params)
        assert t.user_attrs["metrics@4"][key] == \
            pytest.approx(reference_ppl(base, tiny_tokenizer, LL_DOCS[:4]), rel=1e-6)
        seen.append(t.user_attrs["metrics@4"][key])
    assert len({round(v, 9) for v in seen}) == 3  # different merges, different scores
    merger.set_weights(res.best_weights)  # the re-score used every document
    assert res.best_metrics[key] == pytest.approx(reference_ppl(base, tiny_tokenizer, LL_DOCS), rel=1e-6)
    assert res.best_value == pytest.approx(obj.fn.value(res.best_metrics))


def test_cli_search_with_an_lmeval_objective(tiny_pool, tmp_path, capsys):
    from optimer_lib.checkpoints.vectors import save_vector
    from optimer_lib.cli import main

    base, tuned = tiny_pool("llama", 2)
    files = []
    for i, d in enumerate(tuned):
        files.append(tmp_path / f"v{i}.safetensors")
        save_vector(extract_vector(base, d, name=f"v{i}"), files[-1])
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n\n".join(f"the quick brown fox {i}" for i in range(10)))
    spec = f"lmeval:{EXAMPLE / 'arith_mc.yaml'}:acc_norm=1,loss:notes=0.1"
    wd = tmp_path / "search"
    assert main(["search", "--base", str(base), "--vector", str(files[0]), "--vector", str(files[1]),
                 "--eval", f"notes={corpus}", "--objective", spec, "--trials", "2", "--search-limit", "4",
                 "--rescore-limit", "8", "--top-k", "1", "--sampler", "random", "--workdir", str(wd)]) == 0
    best = json.loads((wd / "best.json").read_text())
    assert json.loads(capsys.readouterr().out)["objective"] == pytest.approx(best["objective"])
    key = f"lmeval:{EXAMPLE / 'arith_mc.yaml'}:acc_norm"
    assert best["objective_spec"] == spec and {key, "loss:notes"} <= set(best["metrics"])
    assert best["objective"] == pytest.approx((-best["metrics"][key] + 0.1 * best["metrics"]["loss:notes"]) / 1.1)
    assert best["metrics"][key] * 8 == pytest.approx(round(best["metrics"][key] * 8))  # 8 documents re-scored


def test_shipped_example_is_the_math_dev_split_and_runs_from_anywhere(tiny_tokenizer, tmp_path, monkeypatch):
    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_arith_mc
    finally:
        sys.path.remove(str(EXAMPLE))
    docs = [json.loads(line) for line in (EXAMPLE / "arith_mc.jsonl").read_text().splitlines()]
    assert docs == make_arith_mc.items()  # the file is what the script generates
    from optimer_lib.data import load_corpus, qa_pairs

    gold = [a for _, a in qa_pairs(load_corpus("math", "dev"))[:len(docs)]]
    assert [d["choices"][d["label"]] for d in docs] == gold
    assert all(len(set(d["choices"])) == 4 for d in docs)

    monkeypatch.chdir(tmp_path)  # data_files resolve against the YAML, not the working directory
    model = make_model("llama", seed=0)
    got = LMEvalScorer().evaluate(load_task(str(EXAMPLE / "arith_mc.yaml")), model, tiny_tokenizer, limit=6)
    mc = [{"q": f"Question: {d['question']}\nAnswer:", "choices": d["choices"], "label": d["label"]} for d in docs]
    assert got == pytest.approx(reference_mc(model, tiny_tokenizer, mc[:6]))


def test_mistakes_are_clean_errors(tasks, tmp_path, monkeypatch):
    root = tasks["mc"].parent
    cases = [
        (f"lmeval:{tmp_path}/nope.yaml", "does not exist"),
        (f"lmeval:{root}/tiny_mx", "no lm-eval task 'tiny_mx'.*did you mean tiny_mc"),
        (f"lmeval:{root}", "defines 2 lm-eval groups/tasks .*tiny_ll.*tiny_mc"),
        (f"lmeval:{tasks['mc']}:f1", "has no metric 'f1'.*acc, acc_norm"),
        (f"lmeval:{tasks['mc']},lmeval:{tasks['mc']}:acc", "given twice"),
        (f"lmeval:{tmp_path}/missing_dir/x", "no such YAML file or directory"),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_objective(spec, ["en"])

    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read lm-eval task file"):
        load_task(str(bad))
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("dataset_path: json\n")
    with pytest.raises(ConfigError, match="names no task"):
        load_task(str(nameless))
    no_data = write_task(tmp_path / "nodata", "nodata", MC_YAML, MC_DOCS)
    (no_data.parent / "data" / "nodata.jsonl").unlink()
    with pytest.raises(DataError, match="cannot be read offline"):
        load_task(str(no_data))
    with pytest.raises(ConfigError, match="cannot be read offline"):  # parse_objective reports it as a ConfigError
        parse_objective(f"lmeval:{no_data}", [])

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'optimer-workbench\[lmeval\]'"):
        parse_objective(f"lmeval:{tasks['mc']}", ["en"])


def test_nothing_is_downloaded(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants as hub_constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # a process that is online...
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hub = tmp_path / "hub.yaml"
    hub.write_text(MC_YAML.format(name="hub_task").replace("dataset_path: json", "dataset_path: optimer-test/nope"))
    with pytest.raises(DataError, match="OfflineModeIsEnabled"):  # ...is offline while lm-eval loads data
        load_task(str(hub))
    assert hub_constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False  # and online again
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ


@pytest.mark.slow  # lm-eval indexes its ~14k shipped task YAMLs first (about 10 s)
def test_shipped_task_names():
    with pytest.raises(ConfigError, match="unknown lm-eval task 'hellaswagg'.*did you mean hellaswag"):
        parse_objective("lmeval:hellaswagg", [])
    with pytest.raises(ConfigError, match="cannot be read offline"):  # unless its dataset is in the HF cache
        parse_objective("lmeval:hellaswag", [])
