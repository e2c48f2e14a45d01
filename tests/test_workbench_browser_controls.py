"""Workbench controls in a real browser (Debian chromium, fixtures of test_workbench_browser): Tune presets,
stopping a search, sending its best trial to Tune, clearing the chat, adding a vector and opening a pool.

Each test checks what the click changed: slider values, the scores the chart draws against independently
computed references, the trials in Optuna storage, the chat history the next prompt is sent with, the files
and manifest in the workdir. Screenshots go to ``test-artifacts/``. Slow set (about a minute on 2 cores, a
quarter of it starting the server and the browser): ``make test-slow``, which CI runs.
"""

from __future__ import annotations

import json
import re

import optuna
import pytest
import test_workbench_browser as wb
import torch
from optuna.trial import TrialState
from test_workbench_browser import ARTIFACTS, current_bars, plot_data, wait_for

# the server/browser/page fixtures and the chromium skip marker of the first browser test module
browser, server, page = wb.browser, wb.server, wb.page
pytestmark = [wb.pytestmark, pytest.mark.slow]
TOL = 1e-5  # two scorings of the same merge (in-place updates may differ from a fresh merge by rounding)


def sliders(pg, n: int) -> list[float]:
    return [float(pg.locator(f"#alpha-{i} input[type=number]").input_value()) for i in range(n)]


def bars(pg, name: str) -> list[float]:
    """The y values of every trace called ``name`` in the Tune chart (loss deltas, then accuracies)."""
    return [y for t in plot_data(pg, "tune-chart") if t["name"] == name for y in t["y"]]


def close(a: list[float], b: list[float], tol: float = TOL) -> bool:
    return len(a) == len(b) > 0 and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def table_names(pg) -> list[str]:
    """The name column of the Pool tab's vector table (first word of each body row)."""
    return pg.evaluate("""() => [...document.querySelectorAll('#pool-table [role=row][data-index]')]
        .map(r => r.innerText.trim().split(/\\s+/)[0])""")


def study_of(status: str, root) -> optuna.Study:
    """The study a Search-tab status line names, loaded from the workbench storage."""
    name = re.search(r"(wb-[\d-]+)", status).group(1)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'optuna.db'}")


def test_presets_set_the_sliders_and_score_that_merge(page):
    page.get_by_role("tab", name="Tune").click()
    wait_for(lambda: current_bars(page), what="the first Tune chart")
    page.locator("#preset-best").click()  # no search yet: an error that says what to do, sliders untouched
    page.wait_for_selector("#tune-status >> text=no search result yet")

    page.locator("#preset-average").click()
    wait_for(lambda: sliders(page, 2) == [0.5, 0.5], what="sliders at 1/K = 0.5 each")
    # the current merge is scored: its bars equal the 'average' reference, scored on another model
    wait_for(lambda: close(bars(page, "current"), bars(page, "average")), what="current bars = average bars")
    assert not close(bars(page, "current")[:2], [0.0, 0.0])  # the average merge differs from the base

    page.locator("#preset-zeros").click()
    wait_for(lambda: sliders(page, 2) == [0.0, 0.0], what="sliders at 0")
    # the base itself: losses drawn as the difference to the base loss are 0, accuracy is the base's
    wait_for(lambda: close(bars(page, "current"), [0.0, 0.0, *bars(page, "base")]),
             what="current bars = base (zero loss deltas, base accuracy)")
    page.screenshot(path=str(ARTIFACTS / "workbench-presets.png"), full_page=True)


# the status line's text; the block's own innerText also holds Gradio's (hidden) "processing | 0.3s" tracker
STATUS_TEXT = "#search-status [data-testid=markdown]"


def test_stop_keeps_the_finished_trials_and_ends_the_search(page, server):
    page.get_by_role("tab", name="Search").click()
    page.locator("#search-trials input").fill("400")
    page.locator("#search-start").click()

    def points() -> int:
        traces = plot_data(page, "search-history")
        return max((len(t["y"]) for t in traces if t["name"] == "Objective Value"), default=0)

    wait_for(lambda: points() >= 2, what="two trials of the running search")
    page.locator("#search-stop").click()
    page.wait_for_selector("#search-status >> text=stopped")
    status = page.locator(STATUS_TEXT).inner_text()
    kept = int(re.search(r"after (\d+) trials", status).group(1))
    study = study_of(status, server[1])
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert 2 <= kept < 400 and len(complete) == kept  # every finished trial kept, the rest never ran
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert all(t.user_attrs.get("interrupted") for t in trials if t.state != TrialState.COMPLETE)
    page.wait_for_timeout(2000)  # stopped means stopped: no trial is added afterwards
    assert len(study_of(status, server[1]).trials) == len(trials)
    assert page.locator(STATUS_TEXT).inner_text().startswith("stopped")  # not "stopping" or "running" drawn over it
    page.screenshot(path=str(ARTIFACTS / "workbench-search-stopped.png"), full_page=True)


def test_send_best_and_best_preset_load_the_best_trial(page, server):
    page.get_by_role("tab", name="Tune").click()  # Gradio mounts a tab's sliders on first visit
    page.wait_for_selector("#alpha-0 input[type=number]")
    page.get_by_role("tab", name="Search").click()
    page.locator("#search-trials input").fill("4")
    page.locator("#search-start").click()
    page.wait_for_selector("#search-status >> text=done")
    study = study_of(page.locator("#search-status").inner_text(), server[1])
    best = min(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    expect = [best.params[n] for n in ("ja", "math")]
    assert len(study.trials) == 4

    def at_best() -> bool:
        return all(abs(a - b) < 1e-3 for a, b in zip(sliders(page, 2), expect, strict=True))

    page.locator("#search-send-best").click()
    wait_for(at_best, what=f"Tune sliders at trial {best.number}'s weights {expect}")
    page.get_by_role("tab", name="Tune").click()
    # the merge now in Tune is the best trial's: its bars equal the 'best' reference's
    wait_for(lambda: close(bars(page, "current"), bars(page, "best")), what="current bars = best bars")

    page.locator("#preset-zeros").click()
    wait_for(lambda: sliders(page, 2) == [0.0, 0.0], what="sliders at 0")
    page.locator("#preset-best").click()
    wait_for(at_best, what="the 'best of last search' preset to load the same weights")
    page.screenshot(path=str(ARTIFACTS / "workbench-send-best.png"), full_page=True)


def test_clear_empties_every_pane_and_the_next_prompt_starts_afresh(page):
    page.get_by_role("tab", name="Chat").click()
    wait_for(lambda: all(page.locator(f"#chat-model-{i} input").input_value() for i in range(2)),
             what="a model in each pane (filled when the page has loaded)")

    def exchange(prompt: str) -> None:
        """Send ``prompt`` and wait until both panes hold one more finished reply."""
        before = [page.locator(f"#chat-{i} [data-testid=bot]").count() for i in range(2)]
        page.locator("#chat-prompt textarea").fill(prompt)
        page.locator("#chat-send").click()
        # a pane's new message and the "generating" status arrive in the same update; the status clears at the end
        wait_for(lambda: all(page.locator(f"#chat-{i} [data-testid=bot]").count() == before[i] + 1 for i in range(2))
                 and not page.locator("#chat-status >> text=generating").count(), what=f"two replies to {prompt!r}")

    def user_messages(i: int) -> list[str]:
        return [m.strip() for m in page.locator(f"#chat-{i} [data-testid=user]").all_inner_texts() if m.strip()]

    exchange("the quick brown")
    exchange("fox jumps")
    shown = [user_messages(i) for i in range(2)]
    assert shown == [["the quick brown", "fox jumps"]] * 2, shown
    page.locator("#chat-clear").click()
    wait_for(lambda: all(page.locator(f"#chat-{i} [data-testid=user], #chat-{i} [data-testid=bot]").count() == 0
                         for i in range(2)), what="empty panes")
    exchange("12 + 35 =")  # the server gets the cleared (empty) histories: one exchange per pane
    shown = [user_messages(i) for i in range(2)]
    assert shown == [["12 + 35 ="]] * 2, shown
    page.screenshot(path=str(ARTIFACTS / "workbench-chat-clear.png"), full_page=True)


def test_add_a_checkpoint_then_open_another_pool(page, server):
    """Last in this module: it changes the pool the server holds."""
    from conftest import make_model, make_tokenizer, perturbed
    from transformers import AutoModelForCausalLM

    from optimer_lib.checkpoints.vectors import load_vector

    root = server[1]
    perturbed(make_model("llama"), 0.05, seed=77).save_pretrained(root / "cpt" / "legal")  # CPT of the pool's base
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "cpt" / "legal")

    page.get_by_role("tab", name="Pool").click()
    page.get_by_text("add a vector").click()
    page.locator("#pool-add-path textarea").fill("cpt/legal")
    page.locator("#pool-add-path textarea").press("Tab")
    page.locator("#pool-add").click()
    page.wait_for_selector("#pool-status >> text=added; the pool is now ja, math, legal")
    wait_for(lambda: table_names(page) == ["ja", "math", "legal", "instruct"], what="legal in the vector table")
    vec = load_vector(root / "vectors" / "legal.safetensors")  # extracted into the workdir: tuned − base
    tuned = AutoModelForCausalLM.from_pretrained(root / "cpt" / "legal").state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(vec.tensors[name], tuned[name] - base.state_dict()[name])
    manifest = json.loads((root / "workbench.json").read_text())
    assert manifest["vectors"] == ["vectors/ja.safetensors", "vectors/math.safetensors", "vectors/legal.safetensors"]
    page.get_by_role("tab", name="Tune").click()
    page.wait_for_selector("#alpha-2 >> text=α legal")
    page.screenshot(path=str(ARTIFACTS / "workbench-pool-added.png"), full_page=True)

    page.get_by_role("tab", name="Pool").click()
    page.get_by_text("choose base, vectors and instruction vector").click()
    page.get_by_label("vectors/math.safetensors").uncheck()
    page.locator("#pool-open").click()
    page.wait_for_selector("#pool-status >> text=opened a pool of ja, legal")
    manifest = json.loads((root / "workbench.json").read_text())
    assert manifest["vectors"] == ["vectors/ja.safetensors", "vectors/legal.safetensors"]
    assert manifest["instruction"] == "vectors/instruct.safetensors"
    wait_for(lambda: table_names(page) == ["ja", "legal", "instruct"], what="math to leave the vector table")
    page.get_by_role("tab", name="Tune").click()
    page.wait_for_selector("#alpha-1 >> text=α legal")
    assert not page.locator("#alpha-2").is_visible()
    page.screenshot(path=str(ARTIFACTS / "workbench-pool-opened.png"), full_page=True)
