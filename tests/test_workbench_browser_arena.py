"""The Chat tab's Arena mode in a real browser (Debian chromium, fixtures of test_workbench_browser): ask two
anonymous merges, vote, see the next pair answer, send the best estimate to Tune.

Checks what each click changed against the arena study in the workdir's ``arena.db``: the vote stored, the
next pair's trial numbers, the Tune sliders at the stored best weights. Slow set (a server and a browser).
"""

from __future__ import annotations

import pytest
import test_workbench_browser as wb
from test_workbench_browser import ARTIFACTS, wait_for

from optimer_lib.merging.recipes import load_recipe
from optimer_lib.search.arena import Arena

browser, server, page = wb.browser, wb.server, wb.page
pytestmark = [wb.pytestmark, pytest.mark.slow]


def replies(pg) -> list[str]:
    """Both arena replies once both are complete (empty while generating)."""
    texts = [pg.locator(f"#arena-{s} .bot").last.inner_text() if pg.locator(f"#arena-{s} .bot").count() else ""
             for s in ("a", "b")]
    done = all(t.strip() for t in texts) and not pg.locator("#arena-status >> text=generating").count()
    return texts if done else []


def sliders(pg, n: int) -> list[float]:
    return [float(pg.locator(f"#alpha-{i} input[type=number]").input_value()) for i in range(n)]


def test_vote_next_pair_and_send_best_to_tune(page, server):
    root = server[1]
    page.get_by_role("tab", name="Tune").click()  # Gradio mounts a tab's sliders on first visit
    page.wait_for_selector("#alpha-0 input[type=number]")
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-mode label", has_text="arena").click()
    page.wait_for_selector("#arena-prompt textarea")
    page.locator("#arena-prompt textarea").fill("the quick brown")
    page.locator("#arena-send").click()
    first = wait_for(lambda: replies(page), what="two arena replies")
    assert len(first) == 2
    arena = Arena.open(["ja", "math"], storage=f"sqlite:///{root / 'arena.db'}", study_name="arena",
                       sampler="random")
    shown = arena.pair()
    assert arena.votes == [] and shown.left.number != shown.right.number

    page.locator("#arena-left").click()  # A is better
    page.wait_for_selector("#arena-status >> text=vote recorded")
    wait_for(lambda: replies(page), what="the next pair's replies")
    votes = arena.votes
    assert [(v["left"], v["right"], v["choice"]) for v in votes] == [(shown.left.number, shown.right.number, "left")]
    nxt = arena.pair()
    # the winner stays, a new challenger joins; the page answered with the new pair (the prompt asked again)
    assert shown.left.number in (nxt.left.number, nxt.right.number)
    assert max(nxt.left.number, nxt.right.number) > max(shown.left.number, shown.right.number)
    assert page.locator("#arena-a .user").last.inner_text().strip() == "the quick brown"
    best = arena.best()
    assert best.number == shown.left.number
    assert "1 vote " in page.locator("#arena-best").inner_text()

    page.locator("#arena-to-tune").click()
    expect = [best.weights[n] for n in ("ja", "math")]
    wait_for(lambda: all(abs(a - b) < 1e-3 for a, b in zip(sliders(page, 2), expect, strict=True)),
             what=f"Tune sliders at the arena's best {expect}")
    page.wait_for_selector("#arena-status >> text=now in Tune")
    page.screenshot(path=str(ARTIFACTS / "workbench-arena.png"), full_page=True)

    name = page.locator("#arena-export-name textarea")
    name.fill("arena-best")
    name.press("Tab")
    page.locator("#arena-export").click()
    page.wait_for_selector("#arena-status >> text=saved to")
    # the export holds the stored best estimate itself (not the sliders' 0.01 steps): its mergekit recipe, exactly
    exported = load_recipe(root / "exports" / "arena-best").weights
    assert {n: exported[n] for n in ("ja", "math")} == pytest.approx(best.weights, abs=1e-12)

    page.locator("#arena-chat-best").click()  # back to the panes, the best (now Tune) in pane 1
    page.wait_for_selector("#chat-prompt textarea")
    wait_for(lambda: page.locator("#chat-model-0 input").input_value() == "Tune merge", what="pane 1 = Tune merge")
    page.wait_for_selector("#chat-status >> text=both panes start a new conversation")  # histories cleared: said
