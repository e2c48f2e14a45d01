"""State that survives a page reload, and recipes loaded into Tune (issue 15, "State that survives").

Unit tests (default suite) drive the restore functions of ``workbench.app`` / ``workbench.tabs.chat`` and the
Export tab's recipe reader on a tiny pool: a snapshot taken from one Session is put back into a fresh one and
the Tune merge, chat panes and watched study must come back; snapshots that no longer fit the pool are
ignored with a note. The browser tests (slow set; Debian chromium, see test_workbench_browser) move a slider,
chat and watch a study, reload the page and check all three are shown again, then load an exported recipe
into Tune from the Export tab.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import optuna
import pytest
import test_workbench_browser as wb
import torch
from test_workbench_browser import ARTIFACTS, TIMEOUT_MS, wait_for
from test_workbench_session import SUITE, tiny_workdir

from workbench.app import browser_secret, restore, restore_tune, restore_watched, tune_snapshot
from workbench.session import BASE_IT, TUNE, Session
from workbench.tabs import Ctx
from workbench.tabs.chat import PANES, RESTORE_KEY, ChatTab, chat_snapshot, restore_chat
from workbench.tabs.export import read_recipe
from workbench.workspace import WorkbenchError, Workspace

torch.set_num_threads(1)
browser = wb.browser  # Debian chromium, launched once per module
in_browser = [wb.pytestmark, pytest.mark.slow]  # skipped (with the reason) without chromium


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tiny_workdir(tmp_path_factory.mktemp("reload") / "wd"), suite=SUITE)


def _session(ws: Workspace) -> Session:
    return Session(ws, tune_limit=3, qa_limit=2)


def _through_browser(value):
    """What localStorage hands back: the JSON of what was stored."""
    return json.loads(json.dumps(value))


# -- Tune ------------------------------------------------------------------------------------------
def test_tune_merge_comes_back_in_a_fresh_session(workspace: Workspace):
    s1 = _session(workspace)
    s1.apply({"ja": 0.4, "math": 0.15}, 0.3, method="ties", params={"density": 0.5, "lam": 0.9})
    snap = _through_browser(tune_snapshot(s1))
    assert snap["names"] == ["ja", "math"] and snap["weights"] == {"ja": 0.4, "math": 0.15}

    s2 = _session(workspace)
    assert s2.tune.weights == {"ja": 0.0, "math": 0.0}
    assert restore_tune(s2, snap) == ""
    assert s2.tune == s1.tune                      # weights, instruction weight, method and params
    assert s2.tune.params == {"density": 0.5, "lam": 0.9} and s2.tune.method == "ties"
    assert s2.last is None                         # restored without scoring: a page load never waits for it
    assert s1.tune.weights == {"ja": 0.4, "math": 0.15}  # the other session is untouched


def test_per_layer_group_weights_come_back_and_other_layouts_do_not(workspace: Workspace):
    s1 = _session(workspace)
    layout = s1.group_layout("layer-groups:2")
    weights = {"ja": 0.0, "math": 0.0, **{f"ja@{g}": 0.1 * (i + 1) for i, g in enumerate(layout)},
               **{f"math@{g}": 0.5 for g in layout}}
    s1.set_tune(weights)
    snap = _through_browser(tune_snapshot(s1))
    s2 = _session(workspace)
    assert restore_tune(s2, snap) == "" and s2.tune.weights == s1.tune.weights  # every group's weight, not zeros
    partial = {**snap, "weights": {k: v for k, v in snap["weights"].items() if k != f"ja@{layout[0]}"}}
    other = {**snap, "weights": {**snap["weights"], "ja@blocks7-9": 1.0}}  # a group this model does not have
    for bad in (partial, other):
        s3 = _session(workspace)
        assert "do not fit this model's layer groups" in restore_tune(s3, bad)
        assert s3.tune.weights == {"ja": 0.0, "math": 0.0}


@pytest.mark.parametrize(("saved", "note"), [
    ({"v": 1, "names": ["ja", "zh"], "weights": {"ja": 0.5, "zh": 0.5}}, "this pool has ['ja', 'math']"),
    ({"v": 99, "names": ["ja", "math"], "weights": {"ja": 0.5, "math": 0.5}}, "another version"),
    ({"v": 1, "names": ["ja", "math"], "weights": {"ja": 0.5, "math": 0.5}, "method": "ties",
      "params": {"rho": 1}}, "could not be restored"),
    ({"v": 1, "names": ["ja", "math"], "weights": {"ja": "x", "math": 0.5}}, "could not be restored"),
    ("garbage", "another version"),
])
def test_stale_tune_snapshots_are_ignored_with_a_note(workspace: Workspace, saved, note: str):
    s = _session(workspace)
    s.apply({"ja": 0.2, "math": 0.2})
    before = s.tune
    got = restore_tune(s, saved)
    assert note in got, got
    assert s.tune == before


# -- Chat ------------------------------------------------------------------------------------------
def _chat_tab(ws: Workspace) -> ChatTab:
    with gr.Blocks():
        return ChatTab(Ctx(workspace=ws, state=gr.State()))


def test_chat_panes_come_back_through_refresh(workspace: Workspace):
    s = _session(workspace)
    # the shape Gradio 6 hands a Chatbot's value back in: content as a list of text parts
    hist = [{"role": "user", "content": [{"type": "text", "text": "hello"}], "metadata": None},
            {"role": "assistant", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]
    snap = _through_browser(chat_snapshot(3, [BASE_IT, TUNE, "CPT math", None], [hist, [], hist, []]))
    assert snap["histories"][0] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    assert restore_chat(s, snap) == ""

    tab = _chat_tab(workspace)
    ups = tab.refresh(s)
    assert len(ups) == len(tab.outputs) == PANES + 1 and tab.outputs[-1] is tab.restored
    models, restored = ups[:PANES], ups[PANES]
    assert [m["value"] for m in models[:3]] == [BASE_IT, TUNE, "CPT math"]
    n, *bots = tab.on_restored(restored)  # the State's change sends the pane count and histories
    assert n["value"] == 3
    assert bots[0]["value"] == snap["histories"][0] and bots[1]["value"] == [] and bots[2]["value"] == bots[0]["value"]
    again = tab.refresh(s)  # consumed: a later refresh (pool change) leaves the panes' histories alone
    assert again[PANES] == gr.skip() and tab.on_restored(None) == [gr.skip()] * (1 + PANES)


def test_chat_pane_of_a_model_the_pool_lost_starts_afresh(workspace: Workspace):
    s = _session(workspace)
    hist = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    note = restore_chat(s, {"v": 1, "n": 2, "choices": ["CPT zh", TUNE], "histories": [hist, hist]})
    assert "['CPT zh'] are not in this pool" in note
    saved = s.ui[RESTORE_KEY]
    assert saved["choices"][:2] == [BASE_IT, TUNE] and saved["histories"][:2] == [[], hist]
    assert "another version" in restore_chat(s, [1, 2])


# -- watched study ----------------------------------------------------------------------------------
def test_watched_study_comes_back_if_still_stored(workspace: Workspace):
    url = workspace.storage_url
    optuna.create_study(storage=url, study_name="kept", load_if_exists=True)
    s = _session(workspace)
    assert restore_watched(s, {"storage": url, "study": "kept"}) == "" and s.watched == (url, "kept")
    t = _session(workspace)
    assert "no longer in" in restore_watched(t, {"storage": url, "study": "deleted"}) and t.watched is None
    assert "malformed" in restore_watched(t, {"storage": url, "study": 3}) and t.watched is None


def test_restore_all_never_raises_and_collects_notes(workspace: Workspace, tmp_path: Path):
    s = _session(workspace)
    notes = restore(s, {"v": 1, "names": ["x"]}, {"v": 1, "choices": "nonsense", "histories": 5},
                    {"storage": "sqlite:////nonexistent/dir/x.db", "study": "s"})
    assert notes.count("\n") == 2 and "not restored" in notes
    assert s.tune.weights == {"ja": 0.0, "math": 0.0} and s.watched is None
    assert restore(_session(Workspace(tmp_path / "empty")), {"v": 1}, None, None) == ""  # no pool: nothing to do


def test_browser_secret_is_stable_and_private(tmp_path: Path):
    a = browser_secret(tmp_path)
    assert browser_secret(tmp_path) == a and len(a) >= 24  # a server restart can still read the saved state
    assert stat.S_IMODE(os.stat(tmp_path / ".workbench-browser-secret").st_mode) == 0o600


# -- recipes into Tune ------------------------------------------------------------------------------
def test_recipe_of_an_export_reads_back_against_the_pool(workspace: Workspace):
    s = _session(workspace)
    s.apply({"ja": 0.35, "math": 0.8}, 0.5)
    s.export("for-recipe", overwrite=True)
    for path in ("exports/for-recipe", "exports/for-recipe/mergekit.yaml",
                 str(workspace.workdir / "exports" / "for-recipe")):
        r = read_recipe(_session(workspace), path, None)
        assert r.weights == pytest.approx({"ja": 0.35, "math": 0.8}) and r.instruction_weight == pytest.approx(0.5)
    with pytest.raises(WorkbenchError, match="outside the workdir"):
        read_recipe(s, "/etc/passwd", None)


# -- in a real browser -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from helpers import free_port

    from workbench.app import launch

    root = tiny_workdir(tmp_path_factory.mktemp("wbreload") / "workdir")
    url = f"sqlite:///{root / 'optuna.db'}"
    for name in ("watch-me", "newest"):  # the tab shows the newest by itself; the test must pick the other
        st = optuna.create_study(storage=url, study_name=name)
        st.enqueue_trial({"ja": 0.1, "math": 0.2})
        st.optimize(lambda t: t.suggest_float("ja", 0, 1) + t.suggest_float("math", 0, 1), n_trials=2)
    port = free_port()
    demo = launch(root, port=port, block=False, suite=SUITE, tune_limit=3, qa_limit=2, poll_s=0.5)
    try:
        yield f"http://127.0.0.1:{port}/", root
    finally:
        demo.close()


def _alpha(pg, i: int) -> float:
    return float(pg.locator(f"#alpha-{i} input[type=number]").input_value())


def _messages(pg, i: int, role: str) -> list[str]:
    return [m.strip() for m in pg.locator(f"#chat-{i} [data-testid={role}]").all_inner_texts() if m.strip()]


@in_browser[0]
@in_browser[1]
def test_reload_restores_tune_chat_and_watched_study(browser, reload_server):
    url, _ = reload_server
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})  # a new context: its own localStorage
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(url)
    pg.wait_for_selector("#pool-table >> text=ja")

    pg.get_by_role("tab", name="Tune").click()
    pg.locator("#tune-method input").click()  # a TIES merge: the reload must show it, not the default method
    pg.get_by_role("option", name="ties").click()
    params = pg.locator("#tune-params textarea, #tune-params input").first
    params.fill("density=0.5")
    params.press("Enter")  # submit
    pg.wait_for_selector("#tune-status >> text=release → chart")
    box = pg.locator("#alpha-0 input[type=number]")
    box.fill("0.7")
    box.press("Tab")  # release
    pg.wait_for_function("() => document.querySelector('#tune-status').innerText.includes('release → chart')")

    pg.get_by_role("tab", name="Chat").click()
    wait_for(lambda: all(pg.locator(f"#chat-model-{i} input").input_value() for i in range(2)), what="pane models")
    pg.locator("#chat-prompt textarea").fill("the quick brown")
    pg.locator("#chat-send").click()
    wait_for(lambda: all(pg.locator(f"#chat-{i} [data-testid=bot]").count() == 1 for i in range(2))
             and not pg.locator("#chat-status >> text=generating").count(), what="two replies")
    replies = [_messages(pg, i, "bot") for i in range(2)]

    pg.get_by_role("tab", name="Search").click()
    wait_for(lambda: "watching newest" in pg.locator("#search-status").inner_text(), what="the default study")
    pg.locator("#search-study input").click()
    pg.get_by_role("option", name="watch-me").click()
    wait_for(lambda: "watching watch-me" in pg.locator("#search-status").inner_text(), what="watch-me watched")
    pg.wait_for_timeout(1000)  # the .then that saves the panes / the study to localStorage runs after each event

    pg.reload()
    pg.wait_for_selector("#pool-table >> text=ja")
    pg.get_by_role("tab", name="Tune").click()  # a tab's components are drawn when it is first shown
    wait_for(lambda: _alpha(pg, 0) == 0.7, what="the restored α of ja")
    assert _alpha(pg, 1) == 0.0
    wait_for(lambda: pg.locator("#tune-method input").input_value() == "ties", what="the restored method")
    assert pg.locator("#tune-params textarea, #tune-params input").first.input_value() == "density=0.5"
    pg.get_by_role("tab", name="Chat").click()
    wait_for(lambda: _messages(pg, 0, "user") == ["the quick brown"], what="the restored chat history")
    assert [_messages(pg, i, "bot") for i in range(2)] == replies
    assert [_messages(pg, i, "user") for i in range(2)] == [["the quick brown"]] * 2
    pg.get_by_role("tab", name="Search").click()
    wait_for(lambda: "watching watch-me" in pg.locator("#search-status").inner_text(), what="watch-me watched")
    assert pg.locator("#search-study input").input_value() == "watch-me"
    assert not pg.locator("#restore-status em").count()  # nothing was stale
    pg.screenshot(path=str(ARTIFACTS / "workbench-reload.png"), full_page=True)

    other = browser.new_page()  # another browser (context): nothing of the first one's state
    other.set_default_timeout(TIMEOUT_MS)
    other.goto(url)
    other.wait_for_selector("#pool-table >> text=ja")
    other.get_by_role("tab", name="Tune").click()
    wait_for(lambda: other.locator("#alpha-0 input[type=number]").is_visible(), what="the sliders")
    assert _alpha(other, 0) == 0.0
    other.close()
    pg.close()


@in_browser[0]
@in_browser[1]
def test_exported_recipe_loads_into_tune_from_the_export_tab(browser, reload_server):
    url, root = reload_server
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(url)
    pg.wait_for_selector("#pool-table >> text=ja")
    pg.get_by_role("tab", name="Tune").click()
    for i, value in enumerate((0.25, 0.55)):
        box = pg.locator(f"#alpha-{i} input[type=number]")
        box.fill(str(value))
        box.press("Tab")
        wait_for(lambda i=i, value=value: _alpha(pg, i) == value, what=f"alpha-{i}")
        pg.wait_for_selector("#tune-status >> text=release → chart")
    pg.get_by_role("tab", name="Export").click()
    name = pg.locator("#export-name textarea")
    name.fill("recipe-src")
    name.press("Tab")
    pg.locator("#export-button").click()
    pg.wait_for_selector("#export-status >> text=saved")

    pg.get_by_role("tab", name="Tune").click()
    pg.locator("#preset-zeros").click()
    wait_for(lambda: [_alpha(pg, 0), _alpha(pg, 1)] == [0.0, 0.0], what="sliders at zero")

    pg.get_by_role("tab", name="Export").click()
    path = pg.locator("#recipe-path textarea")
    path.fill("exports/recipe-src/mergekit.yaml")
    path.press("Tab")
    pg.locator("#recipe-load").click()
    pg.wait_for_selector("#recipe-status >> text=loaded")
    pg.get_by_role("tab", name="Tune").click()
    wait_for(lambda: [_alpha(pg, 0), _alpha(pg, 1)] == [0.25, 0.55], what="the recipe's weights on the sliders")
    pg.screenshot(path=str(ARTIFACTS / "workbench-recipe.png"), full_page=True)

    pg.get_by_role("tab", name="Export").click()  # a path outside the workdir is refused, sliders untouched
    path.fill("/etc/hostname")
    path.press("Tab")
    pg.locator("#recipe-load").click()
    pg.wait_for_selector("#recipe-status >> text=outside the workdir")
    pg.close()
