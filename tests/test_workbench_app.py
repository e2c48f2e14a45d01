"""The Gradio app builds without launching, binds 127.0.0.1 by default, and `optimer workbench` reaches it."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import gradio as gr
import pytest
from conftest import make_model, perturbed

from optimer_lib.cli import build_parser, main
from workbench import app


def test_build_app_does_not_launch(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("OPTIMER_ASSETS", str(tmp_path / "no-assets"))
    demo = app.build_app(tmp_path / "empty")
    assert isinstance(demo, gr.Blocks) and not demo.is_running
    assert (tmp_path / "empty").is_dir()


def test_the_app_skips_gradio_work_per_event_it_never_uses(tmp_path: Path, monkeypatch):
    """The monitoring summary is rebuilt every 1,000 events (not after every one), unless the user chose; with no
    matplotlib installed, no import of it is tried for each streamed update."""
    import contextlib
    import importlib.util

    monkeypatch.setenv("OPTIMER_ASSETS", str(tmp_path / "no-assets"))
    monkeypatch.delenv("GRADIO_ANALYTICS_CACHE_FREQUENCY", raising=False)
    monkeypatch.setattr(gr.utils, "MatplotlibBackendMananger", gr.utils.MatplotlibBackendMananger)  # put back after
    demo = app.build_app(tmp_path / "empty")
    assert demo._queue.ANAYLTICS_CACHE_FREQUENCY == 1000  # gradio's own attribute (sic), read from the setting
    no_matplotlib = importlib.util.find_spec("matplotlib") is None
    assert (gr.utils.MatplotlibBackendMananger is contextlib.nullcontext) == no_matplotlib
    monkeypatch.setenv("GRADIO_ANALYTICS_CACHE_FREQUENCY", "7")  # the user's setting wins
    assert app.build_app(tmp_path / "empty")._queue.ANAYLTICS_CACHE_FREQUENCY == 7


def test_defaults_are_local_and_private():
    sig = inspect.signature(app.launch)
    assert sig.parameters["host"].default == "127.0.0.1" and sig.parameters["share"].default is False
    args = build_parser().parse_args(["workbench"])
    assert (args.host, args.port, args.share, args.workdir) == ("127.0.0.1", 7860, False, Path("runs/demo"))


def test_cli_subcommand_calls_launch(monkeypatch, tmp_path: Path):
    seen = {}
    monkeypatch.setattr(app, "launch", lambda workdir, **kw: seen.update(workdir=workdir, **kw))
    assert main(["workbench", "--workdir", str(tmp_path), "--port", "7999"]) == 0
    assert seen.pop("announce") == f"OptiMer workbench on http://127.0.0.1:7999 (workdir {tmp_path}); Ctrl-C stops it"
    assert seen == {"workdir": tmp_path, "host": "127.0.0.1", "port": 7999, "share": False, "device": "cpu",
                    "threads": None}
    seen.clear()
    assert main(["workbench", "--workdir", str(tmp_path), "--slots", "3", "--heap", "lean"]) == 0
    assert seen["slots"] == 3 and seen["heap"] == "lean" and "tune_slots" not in seen  # build_app's default
    assert main(["workbench", "--workdir", str(tmp_path), "--tune-slots", "1"]) == 0 and seen["tune_slots"] == 1
    assert main(["workbench", "--workdir", str(tmp_path), "--slots", "0"]) == 2  # one-line error, no launch
    assert main(["workbench", "--workdir", str(tmp_path), "--tune-slots", "0"]) == 2


def test_the_capacity_check_plans_the_slots_the_engine_will_hold(monkeypatch, tmp_path: Path):
    from optimer_lib import cli_search

    seen = []
    monkeypatch.setattr(app, "launch", lambda workdir, **kw: None)
    monkeypatch.setattr(cli_search, "check_workbench_pool",
                        lambda wd, dev, dt, slots, base_on, **kw: seen.append(slots))
    assert main(["workbench", "--workdir", str(tmp_path)]) == 0
    assert main(["workbench", "--workdir", str(tmp_path), "--slots", "3"]) == 0
    assert seen == [2, 3]  # the engine's default on a CPU is 2 slots: the plan must count both


def test_base_and_vector_flags_open_a_pool_kept_in_the_workdir(monkeypatch, tmp_path: Path, capsys):
    """`optimer workbench --base B --vector V ...` (files anywhere) saves that pool as the workdir's workbench.json,
    with absolute paths and the dev sets kept; a later start needs only --workdir."""
    from test_workbench_session import tiny_workdir

    from workbench.workspace import Workspace

    src = tiny_workdir(tmp_path / "pool", ("ja", "math", "code"))
    vec = {n: src / "vectors" / f"{n}.safetensors" for n in ("ja", "math", "code", "instruct")}
    wd = tmp_path / "mine"
    launched = []
    monkeypatch.setattr(app, "launch", lambda workdir, **kw: launched.append(workdir))
    assert main(["workbench", "--workdir", str(wd), "--base", str(src / "base"), "--vector", str(vec["ja"]),
                 "--vector", str(vec["math"]), "--instruction", str(vec["instruct"])]) == 0
    assert launched == [wd] and "pool: 2 vector(s) on" in capsys.readouterr().out
    m = Workspace(wd).manifest()
    assert m == {"base": str((src / "base").resolve()), "instruction": str(vec["instruct"].resolve()), "eval": None,
                 "vectors": [str(vec["ja"].resolve()), str(vec["math"].resolve())]}
    Workspace(wd).write_manifest(m["base"], m["vectors"], m["instruction"], ["en", "ja"])  # dev sets a user chose
    assert main(["workbench", "--workdir", str(wd), "--base", str(src / "base"), "--vector", str(vec["code"])]) == 0
    assert "replacing its pool of 2 vector(s)" in capsys.readouterr().out
    m = Workspace(wd).manifest()
    assert m["vectors"] == [str(vec["code"].resolve())] and m["instruction"] is None and m["eval"] == ["en", "ja"]
    assert main(["workbench", "--workdir", str(wd)]) == 0 and Workspace(wd).manifest() == m  # the saved pool
    assert Workspace(wd, suite=None).pool().names == ["code"]


def test_the_url_is_announced_only_once_the_pool_opens(tmp_path: Path, capsys):
    """A pool that fails to open (a vector of another base) ends in its one error, with no URL printed before."""
    from test_workbench_session import tiny_workdir

    from optimer_lib.checkpoints.vectors import extract_vector, save_vector
    from optimer_lib.errors import OptimerError

    root = tiny_workdir(tmp_path / "wd")
    other = make_model("llama", seed=9)
    save_vector(extract_vector(other, perturbed(other, 0.05, seed=1), name="ja"), root / "vectors" / "ja.safetensors",
                overwrite=True)
    with pytest.raises(OptimerError, match="different base"):
        app.launch(root, block=False, port=0, announce="ANNOUNCED")
    assert "ANNOUNCED" not in capsys.readouterr().out


def test_build_app_preloads_the_pool_and_sizes_its_engine(tmp_path: Path):
    from test_workbench_session import SUITE, tiny_workdir

    from workbench.workspace import Workspace

    root = tiny_workdir(tmp_path / "wd")
    seen = {}
    real = Workspace.pool

    def spy(self):
        pool = real(self)
        seen["max_slots"], seen["trim"] = pool.engine.max_slots, pool.engine.trim_memory
        seen["tune_slots"] = pool.tune_slots
        return pool

    Workspace.pool = spy
    try:
        app.build_app(root, suite=SUITE, slots=3, preload=True, tune_slots=2)
    finally:
        Workspace.pool = real
    # opened while building, with the slots asked for; leases trim
    assert seen == {"max_slots": 3, "trim": True, "tune_slots": 2}


@pytest.mark.parametrize("bad", ["../outside", "/etc/passwd"])
def test_pool_paths_stay_in_workdir(tmp_path: Path, bad: str):
    from workbench.workspace import WorkbenchError, Workspace

    with pytest.raises(WorkbenchError, match="outside the workdir"):
        Workspace(tmp_path).resolve(bad)


PROBE = """
import sys, threading, torch
from pathlib import Path
from optimer_lib.engine.heap import configure_heap, trim_heap
if sys.argv[1] in ("lean", "fast"):  # as launch() sets up a server
    assert configure_heap(sys.argv[1])
def anon():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
before = anon()
def work():  # what scoring threads do: many MB-sized blocks held at once, then freed; then the lease ends
    for _ in range(3):
        blocks = [torch.ones(1024 * 1024) for _ in range(64)]
        del blocks
    if sys.argv[1] == "fast":  # a lease ends (the workspace's engine trims)
        assert trim_heap()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(round(anon() - before))
"""


def test_freed_memory_goes_back_to_the_os_on_glibc():
    """Worker threads' freed memory leaves the process when their engine lease ends (engine.heap.trim_heap, which
    the workbench's engine calls) instead of staying in per-thread heaps (measured: 130-560 MB kept without it,
    ~0 with it), and under both heap modes of launch() (engine.heap.configure_heap: "lean" maps every block from
    256 KiB up on its own, "fast" trims); the workspace's engine trims."""
    import platform
    import subprocess
    import sys

    from optimer_lib.engine.heap import trim_heap

    if platform.libc_ver()[0] != "glibc":
        assert trim_heap() is False  # elsewhere it is a no-op that says so
        return
    kept = {mode: int(subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                                     check=True).stdout) for mode in ("default", "lean", "fast")}
    assert max(kept["lean"], kept["fast"]) < 32 and kept["default"] > kept["fast"] + 50, kept


def test_only_the_chat_and_page_load_are_described_and_first_pages_find_their_numbers_ready(tmp_path: Path):
    """Gradio puts the API description in every page it serves: the ~140 UI events stay callable but undescribed,
    and the preloaded pool has its norms, cosines and first chart bars ready (or on the way) before any page asks."""
    from test_workbench_session import SUITE, tiny_workdir

    from workbench.tuning import tuning_key

    root = tiny_workdir(tmp_path / "wd")
    demo = app.build_app(root, suite=SUITE, preload=True)
    described = set(demo.get_api_info()["named_endpoints"])
    assert described == {f"/{name}" for name in app.PUBLIC_API}
    hidden = [fn for fn in demo.fns.values() if fn.api_visibility == "undocumented"]
    assert len(hidden) > 100 and all(fn.fn is not None for fn in hidden)  # still served (not "private")
    chat = next(fn for fn in demo.fns.values() if fn.api_name == "chat")
    assert chat.fn.__name__ == "on_send" and chat.api_visibility == "public"
    page_load = next(fn for fn in demo.fns.values() if fn.api_name == "refresh_all")
    assert page_load.concurrency_limit == 2  # ~first come, first served: 20 pages at once do not all end last
    session = next(b for b in demo.blocks.values() if isinstance(b, gr.State)).value()  # a new page's Session
    pool = session.shared  # the pool build_app opened (one per workspace), before any page refreshed
    assert pool._cos is not None and set(pool._norms) == {"ja", "math", "instruct"}
    # The bars a first page draws (its Tune merge, base and average) were started at launch, in the background:
    # look them up without starting anything.
    iw = session.tune.instruction_weight
    key = tuning_key(pool, session.scoring)
    states = [session.state, *(pool.engine.state(session.preset(p), iw) for p in ("zeros", "average"))]
    deadline = time.monotonic() + 60
    while any(pool.engine.cached(s, key) is None for s in states) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(pool.engine.cached(s, key) is not None for s in states)
