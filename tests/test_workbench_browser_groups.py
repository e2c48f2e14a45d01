"""Per-layer-group sliders of the Tune tab in a real browser (fixtures of test_workbench_browser): choosing
``layer-groups:2`` opens one slider per (vector, group); moving one re-merges only that group, which the engine's
Tune state, the heat-map and the chart all show. Slow set (server and browser start): ``make test-slow``.
"""

from __future__ import annotations

import pytest
import test_workbench_browser as wb
from test_workbench_browser import ARTIFACTS, current_bars, wait_for

browser, server, page = wb.browser, wb.server, wb.page
pytestmark = [wb.pytestmark, pytest.mark.slow]


def heat(pg) -> list[list[float]]:
    """The z rows (vectors x [embed, blocks..., head]) of the Tune heat-map."""
    return pg.evaluate("""() => {
        const el = document.querySelector('#tune-heatmap .js-plotly-plot');
        return el && el.data && el.data[0] && el.data[0].z ? el.data[0].z.map(r => Array.from(r)) : [];
    }""")


def status(pg) -> str:
    return pg.locator("#tune-status").inner_text()


def scored(pg, previous: str) -> list[float]:
    """The chart's bars once a move after status ``previous`` is fully scored (not its estimate or a set)."""
    wait_for(lambda: (t := status(pg)) != previous and "release → chart" in t, what="the move's full score")
    return wait_for(lambda: current_bars(pg), what="the chart's bars")


def test_per_group_sliders_move_one_group(page):
    page.get_by_role("tab", name="Tune").click()
    wait_for(lambda: current_bars(page), what="the first Tune chart")
    box = page.locator("#alpha-0 input[type=number]")
    box.fill("0.4")
    shown = status(page)
    box.press("Tab")
    before = scored(page, shown)
    wait_for(lambda: heat(page) and heat(page)[0] == [0.4] * len(heat(page)[0]), what="a uniform heat-map row")
    assert not page.locator("#groups-0").is_visible()  # off by default

    page.locator("#tune-granularity input").click()
    page.get_by_role("option", name="layer-groups:2").click()
    page.wait_for_selector("#groups-0", state="visible")
    page.locator("#groups-0").get_by_text("per layer group").click()  # the accordion starts collapsed
    g = page.locator("#alpha-0-g2 input[type=number]")  # embed, blocks0-0, blocks1-1, head: the second block
    g.wait_for(state="visible")
    wait_for(lambda: float(g.input_value()) == 0.4, what="the groups to start from the vector's weight")
    assert "blocks1-1" in page.locator("#alpha-0-g2").inner_text()
    g.fill("1.2")
    shown = status(page)
    g.press("Tab")
    row = wait_for(lambda: (h := heat(page)) and h[0][2] == 1.2 and h[0], what="block 1 of vector 0 at 1.2")
    assert row == [0.4, 0.4, 1.2, 0.4] and heat(page)[1] == [0.0] * 4
    after = scored(page, shown)
    assert len(after) == len(before) and after != before  # the new merge, scored
    page.screenshot(path=str(ARTIFACTS / "workbench-tune-groups.png"), full_page=True)
