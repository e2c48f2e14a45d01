"""The checker for assertions that cannot fail (tests/vacuity.py): the four the suite once had, each rule,
opt-outs, and the whole suite passing it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from vacuity import check_source, default_paths, main

# The four assertions issue 18 quoted, as the suite had them (commit fb293b3), in their context.
ORIGINAL_EXPORT = '''
def test_export_and_load_back(page, server):
    out = Path(page.locator("#export-status code").first.inner_text())
    torch.testing.assert_close(merged.state_dict()[name], base.state_dict()[name] + alpha * ja.tensors[name])
    assert "mergekit" in (out / "mergekit.yaml").read_text() or (out / "mergekit.yaml").is_file()
'''
ORIGINAL_COSINE = '''
def test_train_extract_info_merge_search(tmp_path, tiny_pool, corpus):
    info = run("vector", "info", v0, v1).stdout
    assert "notes" in info and "other" in info and "1.000" in info
'''
ORIGINAL_ACCURACY = '''
def test_exact_match_real_model_runs(tiny_tokenizer):
    model = make_model("llama")
    acc = exact_match(model, tiny_tokenizer, [("12 + 35 =", "47"), ("a longer prompt 1 + 1 =", "2")],
                      max_new_tokens=3)
    assert 0.0 <= acc <= 1.0
'''
ORIGINAL_OUTWARD_IP = '''
def test_launch_listens_on_loopback_only_and_opens_no_share_link(served):
    demo, url = served()
    assert demo.server_name == "127.0.0.1" and not demo.share and demo.share_url is None
    assert httpx.get(url + "/config").status_code == 200
    ip = _outward_ip()
    if ip:  # the same port on the machine's network address is closed
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((ip, int(url.rsplit(":", 1)[1])))
'''


def rules(source: str) -> list[tuple[int, str]]:
    return [(f.line, f.rule) for f in check_source(source)]


@pytest.mark.parametrize("source, expected", [
    (ORIGINAL_EXPORT, [(5, "always-true-or")]),
    (ORIGINAL_COSINE, [(4, "number-substring")]),
    (ORIGINAL_ACCURACY, [(6, "range-only")]),
    (ORIGINAL_OUTWARD_IP, [(7, "conditional-assert")]),
])
def test_the_four_quoted_assertions_are_caught(source, expected):
    assert rules(source) == expected


def test_their_replacements_pass():
    fixed = '''
def test_export(page):
    recipe = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "task_arithmetic"

def test_info(optimer):
    norms, table = vector_info_tables(optimer("vector", "info", v0, v1).stdout)
    assert table["notes"] == pytest.approx([1.0, cosine(v0, v1)], abs=1e-4)

def test_accuracy(tiny_tokenizer):
    assert exact_match(model, tiny_tokenizer, right, max_new_tokens=4) == 1.0
    acc = exact_match(model, tiny_tokenizer, wrong)
    assert 0.0 <= acc <= 1.0 and acc == pytest.approx(2 / 3)

def test_loopback(served):
    listeners = listening_addresses(port)
    assert listeners and all(_is_loopback(a) for a in listeners)
    ip = _outward_ip()
    if ip is not None:  # vacuity: ok (an extra probe; the listener check holds on every machine)
        with pytest.raises(OSError):
            connect(ip)
'''
    assert rules(fixed) == []


@pytest.mark.parametrize("line, rule", [
    ("assert True", "constant"),
    ('assert (x == 1, "x must be 1")', "constant"),
    ('assert f"{x}"', "constant"),
    ("assert x == 1 or True", "always-true-or"),
    ("assert p.exists() or p.read_text() == ''", "always-true-or"),
    ("assert x == x", "self-compare"),
    ("assert a.b[0] <= a.b[0]", "self-compare"),
    ("assert len(rows) >= 0", "trivial-bound"),
    ("assert isinstance(value, object)", "trivial-bound"),
    ("assert '3.5' in report", "number-substring"),
    ("assert '-0.25' in report", "number-substring"),
])
def test_each_rule(line, rule):
    assert rules(f"def test_x():\n    {line}\n") == [(2, rule)]


@pytest.mark.parametrize("body", [
    "assert x == 1 or y == 2",
    "assert f() == f()",                      # a call may differ between the two sides
    "assert len(rows) >= 1",
    "assert 'loss:en' in report",
    "assert '| 0.5 |' in card",               # anchored to a table cell
    "share = mix()\n    assert 0.6 < share < 0.9",   # a tolerance, not the whole range
    "acc = f()\n    assert 0 <= acc <= 1\n    assert acc == 0.5",
    "for w in history:\n        assert 0 <= w['a'] <= 1",   # the sampler's bounds: the property itself
    "x = probe()\n    if x:\n        assert x > 1\n    else:\n        pytest.fail('no probe')",
    "if arch == 'gpt2':\n        assert n == 2",  # a parameter, not a probe of the machine
])
def test_sound_assertions_pass(body):
    assert rules(f"def test_x(arch):\n    {body}\n") == []


def test_conditional_forms():
    src = "def test_x():\n    m = re.search('a', s)\n    if m is not None:\n        assert m.start() == 0\n"
    assert rules(src) == [(3, "conditional-assert")]
    src = "def test_x():\n    m = probe()\n    if m:\n        with pytest.raises(OSError):\n            go(m)\n"
    assert rules(src) == [(3, "conditional-assert")]
    src = "def helper():\n    m = probe()\n    if m:\n        assert m\n"  # not a test function
    assert rules(src) == []


def test_opt_out_needs_a_reason():
    ok = "def test_x():\n    assert True  # vacuity: ok (documents that importing the module succeeded)\n"
    assert rules(ok) == []
    bare = "def test_x():\n    assert True  # vacuity: ok\n"
    assert rules(bare) == [(2, "opt-out-without-reason")]


def test_the_suite_has_no_assertion_that_cannot_fail():
    paths = default_paths()
    assert len(paths) > 30 and Path(__file__).resolve() in paths
    findings = [str(f) for p in paths for f in check_source(p.read_text(encoding="utf-8"), str(p))]
    assert findings == [], "\n".join(findings)


def test_command_line(tmp_path, capsys):
    bad = tmp_path / "test_bad.py"
    bad.write_text(ORIGINAL_ACCURACY)
    assert main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{bad}:6: [range-only]")
    good = tmp_path / "test_good.py"
    good.write_text("def test_x():\n    assert 1 + 1 == 2\n")
    assert main([str(good)]) == 0
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("vacuity.py")), str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "[range-only]" in r.stdout and "1 assertion(s)" in r.stderr
