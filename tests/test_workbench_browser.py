"""The workbench in a real browser: Playwright drives Debian's chromium against the app on a tiny pool.

Needs Debian's chromium (``helpers.chromium_path``; ``.ci/run`` installs it with apt); a downloaded browser
is never used.
Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CHROMIUM_MISSING, chromium_path, free_port

CHROMIUM = chromium_path()  # the one definition, shared with .ci/run (python3 tests/helpers.py chromium)
# Without chromium these tests skip; under OPTIMER_STRICT_SKIPS=1 (CI) that skip is an error (skip_policy.py).
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=CHROMIUM_MISSING)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 60_000
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from test_workbench_session import SUITE, tiny_workdir

    from workbench.app import launch

    root = tiny_workdir(tmp_path_factory.mktemp("wb") / "workdir")
    port = free_port()
    demo = launch(root, port=port, block=False, suite=SUITE, tune_limit=3, qa_limit=2, poll_s=0.5)
    try:
        yield f"http://127.0.0.1:{port}/", root
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, server: tuple[str, Path]):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(server[0])
    pg.wait_for_selector("#pool-table")
    yield pg
    pg.close()


def plot_data(page, elem_id: str) -> list[dict]:
    """The traces plotly drew inside a gr.Plot: [{name, x, y}, ...] ([] while nothing is drawn)."""
    return page.evaluate("""(id) => {
        const el = document.querySelector('#' + id + ' .js-plotly-plot');
        return el && el.data ? el.data.map(d => ({name: d.name || '', x: Array.from(d.x || []),
                                                   y: Array.from(d.y || [])})) : [];
    }""", elem_id)


def current_bars(page) -> list[float]:
    return [y for t in plot_data(page, "tune-chart") if t["name"] == "current" for y in t["y"]]


def wait_for(predicate, timeout: float = TIMEOUT_MS / 1000, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def plot_points(pg, plot_id: str) -> list[dict]:
    """Every marker with customdata of the plotly chart in ``#plot_id``: trace name, trial (customdata[0]), hover
    (customdata[1], if any) and its pixel position in the viewport."""
    return pg.evaluate("""(plotId) => {
        const gd = document.querySelector('#' + plotId + ' .js-plotly-plot');
        if (!gd || !gd.data || !gd._fullLayout || !gd._fullLayout.xaxis) return [];
        const fl = gd._fullLayout, box = gd.getBoundingClientRect(), out = [];
        for (const t of gd.data) {
            (t.customdata || []).forEach((cd, i) => out.push({name: t.name, trial: cd[0], hover: cd[1],
                x: box.left + fl._size.l + fl.xaxis.d2p(t.x[i]), y: box.top + fl._size.t + fl.yaxis.d2p(t.y[i])}));
        }
        return out;
    }""", plot_id)


def click_point_until(pg, point: dict, selector: str, tries: int = 4) -> None:
    """Click ``point`` until ``selector`` shows. The plotly_click bridge attaches itself by polling (every 0.5 s):
    on a loaded machine the first click can come before it is attached, so click again (a few times at most)."""
    for attempt in range(tries):
        pg.mouse.move(point["x"], point["y"])
        pg.mouse.click(point["x"], point["y"])
        try:
            pg.wait_for_selector(selector, timeout=15_000)
            return
        except Exception:
            if attempt == tries - 1:
                raise


def test_app_loads_with_pool(page):
    assert page.title() == "OptiMer Workbench"
    page.wait_for_selector("#pool-table >> text=ja")
    wait_for(lambda: plot_data(page, "pool-heatmap"), what="the cosine heatmap")
    page.screenshot(path=str(ARTIFACTS / "workbench-pool.png"), full_page=True)
    # every cell of the vector table shows its whole text: a file path is not cut off at the table's edge
    clipped = page.evaluate("""() => [...document.querySelectorAll('#pool-table, #pool-table *')]
        .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.innerText || e.tagName)""")
    assert clipped == []
    assert "vectors/ja.safetensors" in page.locator("#pool-table").inner_text()


def test_slider_release_updates_chart(page):
    page.get_by_role("tab", name="Tune").click()
    before = wait_for(lambda: current_bars(page), what="the first Tune chart")
    box = page.locator("#alpha-0 input[type=number]")
    box.fill("0.8")
    t0 = time.perf_counter()
    box.press("Tab")  # blur = release: the model is re-merged and scored
    after = wait_for(lambda: (b := current_bars(page)) and b != before and b, what="the chart to change")
    latency = time.perf_counter() - t0
    print(f"slider release -> chart changed in the browser: {latency * 1000:.0f} ms")
    assert len(after) == len(before)
    page.wait_for_selector("#tune-status >> text=release → chart")
    page.screenshot(path=str(ARTIFACTS / "workbench-tune.png"), full_page=True)

    other = page.context.browser.new_page()  # another browser tab: its own session, its own model
    other.goto(page.url)
    other.get_by_role("tab", name="Tune").click()
    assert wait_for(lambda: current_bars(other), what="the second tab's chart") == before
    assert other.locator("#alpha-0 input[type=number]").input_value() == "0"
    other.close()


def test_search_plots_five_trials(page, server):
    page.get_by_role("tab", name="Search").click()
    page.locator("#search-trials input").fill("5")
    page.locator("#search-estimate").click()  # before launch: what it will cost on this pool
    page.wait_for_selector("#search-status >> text=estimated cost")
    page.locator("#search-start").click()

    def points() -> int:
        traces = plot_data(page, "search-history")
        return max((len(t["y"]) for t in traces if t["name"] == "Objective Value"), default=0)

    wait_for(lambda: points() == 5, what="5 points in the optimisation history")
    page.wait_for_selector("#search-status >> text=done")
    assert len(plot_data(page, "search-alphas")) >= 1
    page.screenshot(path=str(ARTIFACTS / "workbench-search.png"), full_page=True)


def test_one_prompt_two_streamed_replies(page):
    page.get_by_role("tab", name="Chat").click()
    page.evaluate("""() => {  // count distinct texts the first pane shows while the reply streams in
        window.__seen = new Set();
        const root = document.querySelector('#chat-0');
        new MutationObserver(() => {
            const bots = root.querySelectorAll('.bot');
            if (bots.length) window.__seen.add(bots[bots.length - 1].innerText);
        }).observe(root, {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#chat-prompt textarea").fill("the quick brown")
    page.locator("#chat-send").click()

    def replies() -> list[str]:
        texts = [page.locator(f"#chat-{i} .bot").last.inner_text() if page.locator(f"#chat-{i} .bot").count()
                 else "" for i in range(2)]
        return texts if all(t.strip() for t in texts) and not page.locator("#chat-status >> text=generating").count() \
            else []

    texts = wait_for(replies, what="two replies")
    assert len(texts) == 2
    seen = page.evaluate("() => window.__seen.size")
    assert seen >= 2, f"the first reply did not stream (saw {seen} states)"
    page.screenshot(path=str(ARTIFACTS / "workbench-chat.png"), full_page=True)


def test_export_and_load_back(page, server):
    from transformers import AutoModelForCausalLM

    from optimer_lib.checkpoints.vectors import load_vector

    root = server[1]
    page.get_by_role("tab", name="Tune").click()
    alphas = [0.3, 0.6]  # ja, math: set here, so the test does not depend on the ones before it
    for i, value in enumerate(alphas):
        before = wait_for(lambda: current_bars(page), what="the Tune chart")
        box = page.locator(f"#alpha-{i} input[type=number]")
        box.fill(str(value))
        box.press("Tab")  # release: re-merged and scored
        wait_for(lambda before=before: (b := current_bars(page)) and b != before, what=f"alpha-{i} to apply")
    page.get_by_role("tab", name="Export").click()
    name_box = page.locator("#export-name textarea")
    name_box.fill("browser-merge")
    name_box.press("Tab")  # Gradio takes the value on blur; a click right after fill can race it under load
    page.locator("#export-button").click()
    page.wait_for_selector("#export-status >> text=saved")
    link = page.wait_for_selector("#export-zip a")
    assert page.request.get(link.get_attribute("href")).ok
    page.screenshot(path=str(ARTIFACTS / "workbench-export.png"), full_page=True)

    # The status names the folder written; it must be under the workdir's exports/.
    out = Path(page.locator("#export-status code").first.inner_text())
    assert out.parent == root / "exports", out
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    ja, math = (load_vector(root / "vectors" / f"{n}.safetensors") for n in ("ja", "math"))
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        torch.testing.assert_close(merged.state_dict()[name], base.state_dict()[name] + alphas[0] * ja.tensors[name]
                                   + alphas[1] * math.tensors[name])
    # the recipe states the same merge: the Tune tab's weights on each vector's CPT checkpoint
    recipe = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "task_arithmetic" and Path(recipe["base_model"]) == root / "base"
    got = [(m["model"], m["parameters"]["weight"]) for m in recipe["models"][:2]]
    assert got == [("cpt/ja", pytest.approx(alphas[0])), ("cpt/math", pytest.approx(alphas[1]))], got


def test_first_start_builds_the_demo_pool(browser, tmp_path: Path, monkeypatch):
    """A workdir without a pool shows the build panel; building (CPT runs faked) fills every tab."""
    from test_workbench_session import SUITE, tiny_workdir
    from tqdm.auto import tqdm

    import optimer_lib.demo
    from workbench.app import launch

    src = tiny_workdir(tmp_path / "assets")
    monkeypatch.setenv("OPTIMER_ASSETS", str(src))  # its base/ plays assets/base

    bar_seen = threading.Event()

    def fake_build_pool(cfg):
        # the page shows this bar (gr.Progress(track_tqdm=True)); it stays until the test has seen it (a fixed
        # 1 s bar was missed by the page's polling on a loaded machine)
        for _ in tqdm(range(600), desc="train ja"):
            if bar_seen.wait(0.1):
                break
        vecs = src / "vectors"
        return [vecs / "ja.safetensors", vecs / "math.safetensors"], vecs / "instruct.safetensors"

    monkeypatch.setattr(optimer_lib.demo, "build_pool", fake_build_pool)
    port = free_port()
    demo = launch(tmp_path / "fresh", port=port, block=False, suite=SUITE, tune_limit=3, qa_limit=2)
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(TIMEOUT_MS)
    try:
        pg.goto(f"http://127.0.0.1:{port}/")
        pg.locator("#setup-build").click()
        pg.wait_for_selector("#setup-status >> text=train ja")  # the progress bar
        pg.screenshot(path=str(ARTIFACTS / "workbench-build.png"))
        bar_seen.set()
        pg.wait_for_selector("#pool-table >> text=math")
        assert not pg.locator("#setup-build").is_visible()
        pg.get_by_role("tab", name="Tune").click()
        wait_for(lambda: current_bars(pg), what="the Tune chart of the new pool")
    finally:
        pg.close()
        demo.close()


@pytest.mark.slow  # ~15 s: two pages scoring at once (make test-slow; CI runs it)
def test_two_sessions_at_once_each_see_their_own_merge(browser, server):
    """Two browser tabs release different sliders at the same moment: one engine serves both, and each tab's
    score is its own merge's (the objective a fresh single session computes for those weights)."""
    from test_workbench_session import SUITE

    from workbench.session import Session
    from workbench.workspace import Workspace

    url, root = server
    values = {"0.35": None, "1.15": None}
    check = Session(Workspace(root, suite=SUITE), tune_limit=3, qa_limit=2)
    for v in values:
        values[v] = f"{check.apply({'ja': float(v)}).objective:.4f}"
    pages = [browser.new_page(viewport={"width": 1400, "height": 1000}) for _ in values]
    try:
        for pg in pages:
            pg.set_default_timeout(TIMEOUT_MS)
            pg.goto(url)
            pg.get_by_role("tab", name="Tune").click()
        for pg in pages:
            wait_for(lambda pg=pg: current_bars(pg), what="each tab's first chart")
        for pg, v in zip(pages, values, strict=True):
            pg.locator("#alpha-0 input[type=number]").fill(v)
        for pg in pages:  # released back to back: the second waits for the engine, not for a model copy
            pg.locator("#alpha-0 input[type=number]").press("Tab")
        for pg, objective in zip(pages, values.values(), strict=True):
            wait_for(lambda pg=pg, o=objective: o in pg.locator("#tune-status").inner_text(),
                     timeout=2 * TIMEOUT_MS / 1000, what=f"objective {objective} in the status (it says "
                          f"{[p.locator('#tune-status').inner_text() for p in pages]})")
        assert [pg.locator("#alpha-0 input[type=number]").input_value() for pg in pages] == list(values)
    finally:
        for pg in pages:
            pg.close()


def test_an_idle_page_polls_the_study_only_while_the_search_tab_is_shown(browser, tmp_path: Path, monkeypatch):
    """The Search tab's charts poll the study storage (every ``poll_s``, 0.5 s here) only while that tab is shown:
    on Pool no poll reaches the server; on Search both panels poll; back on Pool they stop."""
    from test_workbench_session import SUITE, tiny_workdir

    import workbench.tabs.objectives as objectives
    import workbench.tabs.search as search
    from workbench.app import launch

    ticks: list[float] = []
    for cls in (search.SearchTab, objectives.ObjectivesPanel):  # before launch: the app binds these handlers
        real = cls.on_tick

        def counted(self, *a, _real=real, **kw):
            ticks.append(time.monotonic())
            return _real(self, *a, **kw)

        monkeypatch.setattr(cls, "on_tick", counted)
    port = free_port()
    demo = launch(tiny_workdir(tmp_path / "wd"), port=port, block=False, suite=SUITE, tune_limit=3, qa_limit=2,
                  poll_s=0.5)
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(TIMEOUT_MS)
    try:
        pg.goto(f"http://127.0.0.1:{port}/")
        pg.wait_for_selector("#pool-table >> text=ja")
        time.sleep(1.0)
        n = len(ticks)
        time.sleep(3.0)
        assert len(ticks) == n, "an idle page on the Pool tab polled the study storage"
        pg.get_by_role("tab", name="Search").click()
        wait_for(lambda: len(ticks) >= n + 6, timeout=10, what="the Search tab's polls")
        pg.get_by_role("tab", name="Pool").click()
        time.sleep(1.5)  # a tick already on its way may still land
        n = len(ticks)
        time.sleep(3.0)
        assert len(ticks) == n, "the Search tab's timers kept polling after leaving the tab"
    finally:
        pg.close()
        demo.close()
