"""The Search tab in a real browser: a search with a merge method and sample prompts; clicking a point of the history
shows that trial's generations (fixtures of test_workbench_browser; screenshots in ``test-artifacts/``).
"""

from __future__ import annotations

import re

import optuna
import pytest
import test_workbench_browser as wb
from test_workbench_browser import ARTIFACTS, click_point_until, plot_points, wait_for

from optimer_lib.search import record

browser, server, page, pytestmark = wb.browser, wb.server, wb.page, [wb.pytestmark, pytest.mark.slow]


def history_points(pg) -> list[dict]:
    """Every marker of the optimisation history with its customdata and pixel position in the viewport."""
    return [p for p in plot_points(pg, "search-history") if p["name"] == "Objective Value"]


def test_click_a_history_point_shows_its_generations(page, server):
    storage = f"sqlite:///{server[1] / 'optuna.db'}"
    page.get_by_role("tab", name="Search").click()
    page.locator("#search-method input").click()
    page.get_by_role("option", name="ties", exact=True).click()
    page.locator("#search-params textarea").fill("density=0.5")
    page.get_by_text("sample generations per trial").click()        # open the accordion
    page.locator("#search-sample-prompts textarea").fill("the quick\n12 + 35 =")
    page.locator("#search-sample-tokens input").fill("4")
    page.locator("#search-trials input").fill("3")
    page.locator("#search-trials input").press("Tab")
    page.locator("#search-start").click()
    page.wait_for_selector("#search-status >> text=done", timeout=120_000)
    name = re.search(r"(wb-\d{8}-\d{6})", page.locator("#search-status").inner_text()).group(1)
    points = wait_for(lambda: (p := history_points(page)) and len(p) == 3 and p, what="3 points with samples")

    study = optuna.load_study(study_name=name, storage=storage)
    trials = {t.number: t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    assert set(trials) == {p["trial"] for p in points}
    target = points[-1]
    samples = record.trial_samples(trials[target["trial"]])
    assert [s["prompt"] for s in samples] == ["the quick", "12 + 35 ="]
    assert "12 + 35 =" in target["hover"]                             # the hover label previews them
    page.locator("#search-history").scroll_into_view_if_needed()
    target = next(p for p in history_points(page) if p["trial"] == target["trial"])
    click_point_until(page, target, f"#search-samples >> text=trial {target['trial']}")
    shown = page.locator("#search-samples").inner_text()
    assert all(s["prompt"] in shown and s["text"].strip() in shown for s in samples), shown
    page.screenshot(path=str(ARTIFACTS / "workbench-search-samples.png"), full_page=True)


def test_export_tab_writes_a_gguf_that_reimports(page, server, tmp_path):
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    from optimer_lib.checkpoints.gguf_import import import_gguf

    page.get_by_role("tab", name="Export").click()
    name_box = page.locator("#export-name textarea")
    name_box.fill("gguf-merge")
    name_box.press("Tab")
    page.locator("#export-gguf input").click()
    page.get_by_role("option", name="f32", exact=True).click()
    page.locator("#export-button").click()
    page.wait_for_selector("#export-status >> text=GGUF:", timeout=120_000)
    link = page.wait_for_selector("#export-gguf-file a")
    download = page.request.get(link.get_attribute("href"))
    page.screenshot(path=str(ARTIFACTS / "workbench-export-gguf.png"), full_page=True)
    folder = Path(page.locator("#export-status code").first.inner_text())
    gguf_file = folder / "gguf-merge-f32.gguf"
    assert folder.parent == server[1] / "exports" and gguf_file.is_file()
    assert download.ok and download.body() == gguf_file.read_bytes()
    import_gguf(gguf_file, tmp_path / "back")
    want = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "back").state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())
