"""A user's own dev corpus and an lm-eval task as Tune scores, in a real browser (Debian chromium, fixtures of
test_workbench_browser): the corpus is added on the Pool tab, the task in Tune's scoring set, and the Tune chart
draws both with the numbers a fresh session computes for the same merge; removed again on the Pool tab, the corpus
leaves the chart and the scoring set's dev sets. Slow set (server and browser start)."""

from __future__ import annotations

import json

import pytest
import test_workbench_browser as wb
from helpers import require
from test_workbench_browser import ARTIFACTS, wait_for

browser, server, page = wb.browser, wb.server, wb.page
pytestmark = [wb.pytestmark, pytest.mark.slow]
LEGAL = ["the court finds for the plaintiff", "the contract is void", "a lease of land for ten years"]


def current_values(pg) -> dict[str, float]:
    """x label -> absolute value (customdata) of every bar of the Tune chart's ``current`` trace."""
    return pg.evaluate("""() => {
        const el = document.querySelector('#tune-chart .js-plotly-plot');
        const out = {};
        for (const t of (el && el.data) || []) {
            if (t.name !== 'current') continue;
            Array.from(t.x || []).forEach((x, i) => { out[x] = t.customdata[i]; });
        }
        return out;
    }""")


def test_a_corpus_added_in_the_pool_tab_and_an_lmeval_task_are_scored_in_tune(page, server):
    require("lm_eval")
    from test_lmeval import LL_DOCS, LL_YAML, reference_ppl, write_task
    from test_workbench_session import SUITE

    from workbench.session import Session
    from workbench.workspace import Workspace

    root = server[1]
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "legal.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in LEGAL))
    write_task(root / "tasks", "tiny_ll", LL_YAML, LL_DOCS)

    page.get_by_text("add a dev corpus (scored in Tune)").click()
    page.locator("#pool-eval-path input, #pool-eval-path textarea").fill("../legal.jsonl")
    page.locator("#pool-eval-name input, #pool-eval-name textarea").fill("legal")
    page.locator("#pool-eval-add").click()
    page.wait_for_selector("#pool-status >> text=outside the workdir")  # refused, in one line
    page.locator("#pool-eval-path input, #pool-eval-path textarea").fill("data/legal.jsonl")
    page.locator("#pool-eval-add").click()
    page.wait_for_selector("#pool-status >> text=added dev set legal")
    # with every section open the status line is far below the "add a vector" button: the answer is scrolled to
    page.get_by_text("add a vector").click()
    page.get_by_text("choose base, vectors and instruction vector").click()
    page.locator("#pool-add").click()  # no path: refused
    page.wait_for_selector("#pool-status >> text=no path given")
    in_view = """() => { const r = document.getElementById('pool-status').getBoundingClientRect();
                         return r.top >= 0 && r.bottom <= window.innerHeight + 1; }"""
    wait_for(lambda: page.evaluate(in_view), what="the Pool tab's answer scrolled into view")

    fresh = Session(Workspace(root, suite=SUITE), tune_limit=3, qa_limit=2)  # its suite read from workbench.json
    ref = fresh.apply({"ja": 0.8})
    page.get_by_role("tab", name="Tune").click()
    box = page.locator("#alpha-0 input[type=number]")
    box.fill("0.8")
    box.press("Tab")  # release: merged and scored on every set, the new one included

    def scored() -> bool:  # the chart may first show the previous merge's bars (a background score)
        v = current_values(page)
        return all(v.get(k) is not None and abs(v[k] - ref.metrics[f"loss:{k}"]) <= 1e-5 * v[k]
                   for k in ("legal", "ja"))

    wait_for(scored, what="bars of the merge at ja = 0.8, the legal set among them")

    page.get_by_text("scoring set", exact=True).click()
    page.locator("#tune-lmeval input, #tune-lmeval textarea").fill("tasks/tiny_ll.yaml")
    page.locator("#tune-scoring-apply").click()
    page.wait_for_selector("#tune-status >> text=lmeval:tiny_ll:perplexity")  # its own time in the status line
    shown = wait_for(lambda: (v := current_values(page)).get("tiny_ll:perplexity") and v, what="the lm-eval bar")
    with fresh.merged() as model:  # the tab's scoring set: 8 documents per set, so the first 8 of the task
        ppl = reference_ppl(model, fresh.shared.tokenizer, LL_DOCS[:8])
    assert shown["tiny_ll:perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert shown["legal"] == pytest.approx(ref.metrics["loss:legal"], rel=1e-5)  # 3 documents: all of them
    page.wait_for_selector("#tune-cost >> text=+ lm-eval tiny_ll")
    page.screenshot(path=str(ARTIFACTS / "workbench-tune-sources.png"), full_page=True)
    wait_for(lambda: "legal" in page.locator("#tune-sets").inner_text(), what="legal among the dev sets")

    page.get_by_role("tab", name="Pool").click()
    page.locator("#pool-eval-remove").click()
    page.wait_for_selector("#pool-status >> text=choose an added dev corpus to remove")
    page.locator("#pool-eval-added input").click()
    page.get_by_role("option", name="legal", exact=True).click()
    page.locator("#pool-eval-remove").click()
    page.wait_for_selector("#pool-status >> text=removed dev set legal")
    assert json.loads((root / "workbench.json").read_text())["eval"] is None  # as before the corpus was added
    after = Session(Workspace(root, suite=SUITE), tune_limit=3, qa_limit=2)
    after.set_scoring(docs=8, qa_items=8, seq_len=128, batch_size=16)  # the tab's scoring set, without lm-eval
    ref = after.apply({"ja": 0.6})
    page.get_by_role("tab", name="Tune").click()
    wait_for(lambda: page.locator("#tune-sets").inner_text().split("\n")[1:] == ["en", "ja", "math"],
             what="the dev sets without legal (the refresh after the removal)")
    box.fill("0.6")
    box.press("Tab")
    # The chart draws progressively (the first dev set, then all of them): wait for the full set of bars.
    shown = wait_for(lambda: (v := current_values(page)).get("ja") and abs(v["ja"] - ref.metrics["loss:ja"])
                     <= 1e-5 * v["ja"] and len(v) >= 4 and v, what="all four bars of the merge at ja = 0.6")
    assert "legal" not in shown and sorted(shown) == ["en", "ja", "math", "tiny_ll:perplexity"]
    assert shown["en"] == pytest.approx(ref.metrics["loss:en"], rel=1e-5)
