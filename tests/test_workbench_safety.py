"""A safe-by-default workbench: loopback only, optional login, no share link, paths confined to the workdir,
capped prompts and replies, sessions that never see each other's merge, and no re-merge during a generation.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time

import httpx
import pytest
import torch
from helpers import free_port
from test_workbench_session import SUITE, tiny_workdir

from optimer_lib.cli import main
from workbench import app
from workbench.chatting import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, GenSettings, stream_reply
from workbench.session import BASE, TUNE, Session
from workbench.workspace import WorkbenchError, Workspace

torch.set_num_threads(1)


def _outward_ip() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one besides loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.fixture
def served(tmp_path, monkeypatch):
    """``served(**launch_kwargs)``: a running workbench on an empty workdir; closed after the test."""
    monkeypatch.setenv("OPTIMER_ASSETS", str(tmp_path / "no-assets"))  # no pool: the app starts at once
    demos = []

    def start(**kw):
        port = free_port()
        demo = app.launch(tmp_path / "wd", port=port, block=False, threads=1, **kw)
        demos.append(demo)
        return demo, f"http://127.0.0.1:{port}"

    yield start
    for d in demos:
        d.close()



def test_launch_survives_gradios_one_shot_localhost_check(served, monkeypatch):
    """On a busy machine Gradio's single 3-second probe of its new server can time out and make launch() raise
    "localhost is not accessible" although the server is up (seen in the parallel test run); launch asks again."""
    import gradio.networking

    monkeypatch.setattr(gradio.networking, "url_ok", lambda url: False)  # the probe times out
    demo, url = served()
    assert httpx.get(url + "/config", timeout=30).status_code == 200
    assert demo.local_url.rstrip("/") == url

def listening_addresses(port: int) -> list[str]:
    """The local addresses of the TCP sockets listening on ``port`` (Linux: /proc/net/tcp and tcp6)."""
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            next(f)  # header
            for line in f:
                local, state = line.split()[1], line.split()[3]
                addr, _, hex_port = local.partition(":")
                if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                # the kernel prints each 32-bit word in host (little-endian) byte order
                raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, width, 8))
                found.append(str(ipaddress.ip_address(raw)))
    return found


def _is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_launch_listens_on_loopback_only_and_opens_no_share_link(served):
    demo, url = served()
    assert demo.server_name == "127.0.0.1" and not demo.share and demo.share_url is None
    assert httpx.get(url + "/config").status_code == 200
    port = int(url.rsplit(":", 1)[1])
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("reading listening sockets needs Linux's /proc/net/tcp")
    listeners = listening_addresses(port)
    assert listeners and all(_is_loopback(a) for a in listeners), f"port {port} listens on {listeners}"
    assert not _is_loopback("0.0.0.0") and not _is_loopback("::")  # the all-interfaces binds are caught
    ip = _outward_ip()
    if ip is not None:  # vacuity: ok (an extra end-to-end probe; the listener check above holds on every machine)
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((ip, port))


def test_auth_guards_pages_and_api(served):
    from gradio_client import Client

    demo, url = served(auth="alice:s3cret:x")  # the password may contain ':'
    assert httpx.get(url + "/config").status_code == 401
    assert httpx.get(url + "/gradio_api/info").status_code == 401
    assert httpx.post(url + "/login", data={"username": "alice", "password": "s3cret"}).status_code == 400
    with pytest.raises(Exception, match="credentials|login|[Aa]uth"):
        Client(url, verbose=False)
    client = Client(url, auth=("alice", "s3cret:x"), verbose=False)
    assert client.view_api(return_format="dict", print_info=False)["named_endpoints"]


def test_cli_auth_flag_env_and_warnings(monkeypatch, tmp_path, capsys):
    seen: list[dict] = []
    monkeypatch.setattr(app, "launch", lambda workdir, **kw: seen.append(kw))
    monkeypatch.delenv("OPTIMER_AUTH", raising=False)
    assert main(["workbench", "--workdir", str(tmp_path)]) == 0
    assert "auth" not in seen[-1] and seen[-1]["share"] is False and seen[-1]["host"] == "127.0.0.1"
    assert main(["workbench", "--workdir", str(tmp_path), "--auth", "alice:pw:with:colons"]) == 0
    assert seen[-1]["auth"] == ("alice", "pw:with:colons")
    monkeypatch.setenv("OPTIMER_AUTH", "bob:hunter2")
    assert main(["workbench", "--workdir", str(tmp_path)]) == 0
    assert seen[-1]["auth"] == ("bob", "hunter2")
    assert main(["workbench", "--workdir", str(tmp_path), "--auth", "carol:x"]) == 0  # the flag wins
    assert seen[-1]["auth"] == ("carol", "x")
    n = len(seen)
    for bad in ("alice", ":pw", "alice:"):
        assert main(["workbench", "--workdir", str(tmp_path), "--auth", bad]) == 2
    assert len(seen) == n and "error: bad --auth" in capsys.readouterr().err  # refused before launching
    monkeypatch.delenv("OPTIMER_AUTH")
    assert main(["workbench", "--workdir", str(tmp_path), "--host", "0.0.0.0"]) == 0
    assert "without --auth" in capsys.readouterr().err


def test_paths_typed_in_the_ui_stay_in_the_workdir(tmp_path):
    wd = tiny_workdir(tmp_path / "wd")
    ws = Workspace(wd, suite=SUITE)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "v.safetensors").write_bytes((wd / "vectors" / "ja.safetensors").read_bytes())
    (wd / "link").symlink_to(outside)  # a link inside the workdir pointing out of it
    for bad in ("link/v.safetensors", "link", "../outside/v.safetensors", str(outside / "v.safetensors"),
                "~/x", "vectors/../../outside"):
        with pytest.raises(WorkbenchError, match="outside the workdir"):
            ws.add_vector(bad)
    assert ws.resolve(str(wd / "vectors" / "ja.safetensors")) == wd / "vectors" / "ja.safetensors"
    s = Session(ws)
    with pytest.raises(WorkbenchError, match="bad export name"):
        s.export("../../escape")
    assert not (tmp_path / "escape").exists()


@pytest.fixture
def pair(tmp_path) -> tuple[Session, Session]:
    ws = Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE)
    return Session(ws, tune_limit=2, qa_limit=1), Session(ws, tune_limit=2, qa_limit=1)


def test_prompt_and_reply_lengths_are_capped(pair, monkeypatch):
    s, _ = pair
    seen = []
    model = s.shared.model
    real = type(model).generate

    def spy(self, *a, **kw):
        seen.append((kw["input_ids"].shape[1], kw["max_new_tokens"]))
        return real(self, *a, **kw)

    monkeypatch.setattr(type(model), "generate", spy)  # every engine slot is a copy of this class
    huge = "the quick brown fox " * 500_000  # 10 MB: trimmed before tokenising, then to the token cap
    history = [{"role": "user", "content": "x" * 1_000_000}, {"role": "assistant", "content": "y" * 1_000_000}]
    t0 = time.perf_counter()
    final = list(s.chat(huge, [BASE], [history], GenSettings(max_new_tokens=10**9, max_prompt_tokens=10**9,
                                                             greedy=True)))[-1]
    assert time.perf_counter() - t0 < 30
    positions = model.config.max_position_embeddings  # 64 for the tiny model: new <= 32, prompt <= 32
    assert seen == [(positions // 2, positions // 2)], seen
    assert final[0][-1]["role"] == "assistant"
    capped = GenSettings(max_new_tokens=10**9, max_prompt_tokens=10**9).capped(None)
    assert (capped.max_new_tokens, capped.max_prompt_tokens) == (MAX_NEW_TOKENS, MAX_PROMPT_TOKENS)
    assert GenSettings(max_new_tokens=-5, max_prompt_tokens=0).capped(None).max_new_tokens == 1


def test_chat_sliders_refuse_values_above_the_caps(tmp_path, monkeypatch):
    """The UI (and its API) cannot even send more: Gradio refuses slider values above their maximum."""
    monkeypatch.setenv("OPTIMER_ASSETS", str(tmp_path / "no-assets"))
    demo = app.build_app(tmp_path / "wd")
    new = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "chat-max-new")
    assert new.maximum == MAX_NEW_TOKENS
    with pytest.raises(Exception, match="greater than maximum"):
        new.preprocess(MAX_NEW_TOKENS + 1)
    prompt_sliders = [b for b in demo.blocks.values() if getattr(b, "label", None) == "max prompt tokens"]
    assert prompt_sliders and all(b.maximum == MAX_PROMPT_TOKENS for b in prompt_sliders)


def _greedy(session: Session, pane: str = BASE) -> str:
    settings = GenSettings(max_new_tokens=12, greedy=True)
    return list(session.chat("the quick brown", [pane], settings=settings))[-1][0][-1]["content"]


def test_concurrent_sessions_never_see_each_others_merge(pair):
    a, b = pair
    b.apply({"ja": 0.0, "math": 0.0})
    alone = [_greedy(b, TUNE), _greedy(b, BASE)]  # what b gets with nobody else around
    a_weights = [{"ja": 1.5 * (i % 2), "math": 1.5 * ((i + 1) % 2)} for i in range(12)]
    errors: list[BaseException] = []
    replies: list[list[str]] = []
    a_chats: list[str] = []

    def tune_a() -> None:
        try:
            for w in a_weights:
                a.apply(w)
                a_chats.append(_greedy(a, TUNE))
        except BaseException as exc:  # reported below
            errors.append(exc)

    def chat_b() -> None:
        try:
            for _ in range(4):
                replies.append([_greedy(b, TUNE), _greedy(b, BASE)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=tune_a), threading.Thread(target=chat_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert replies == [alone] * 4  # b's models never moved while a re-merged and chatted
    assert a.tune.weights == a_weights[-1] and b.tune.weights == {"ja": 0.0, "math": 0.0}
    assert len(a_chats) == len(a_weights)


def test_a_remerge_waits_for_the_running_generation(tmp_path):
    """One engine slot for everyone (the worst case): a re-merge asked mid-reply waits for the reply's end,
    and the reply runs on the weights it started with."""
    ws = Workspace(tiny_workdir(tmp_path / "wd"), suite=SUITE, slots=1)
    s, other = Session(ws, tune_limit=2, qa_limit=1), Session(ws, tune_limit=2, qa_limit=1)
    engine = s.shared.engine
    state = engine.state({"ja": 1.0, "math": 0.0})
    with engine.lease(state) as lease:
        model = lease.model  # the only slot: every request below is served by this model
    emb = model.get_input_embeddings().weight
    seen: list[float] = []
    steps: list[float] = []
    started = threading.Event()

    def slow_step(module, args):  # every decoding step records the weights it runs with
        if threading.current_thread().name != "chat-generate":
            return  # the other session's scoring runs on the same slot afterwards
        seen.append(float(emb.detach().double().sum()))
        started.set()
        time.sleep(0.1)
        steps.append(time.perf_counter())

    hook = model.register_forward_pre_hook(slow_step)
    times: dict[str, float] = {}

    def generate() -> None:
        for _ in stream_reply(engine, state, [], "the quick", GenSettings(max_new_tokens=10, greedy=True)):
            pass
        times["generation done"] = time.perf_counter()

    def remerge() -> None:
        times["remerge asked"] = time.perf_counter()
        with engine.lease({"ja": 0.0, "math": 1.0}) as lease:  # the same slot: must wait for the reply
            assert lease.model is model
            times["remerge done"] = time.perf_counter()

    def other_session() -> None:
        other.apply({"ja": 1.0, "math": 1.0})
        times["other done"] = time.perf_counter()

    gen = threading.Thread(target=generate)
    gen.start()
    assert started.wait(60)
    threads = [threading.Thread(target=remerge), threading.Thread(target=other_session)]
    for t in threads:
        t.start()
    for t in [gen, *threads]:
        t.join(120)
    hook.remove()
    assert len(seen) >= 5 and len(set(seen)) == 1, "the weights changed during the generation"
    assert times["remerge asked"] < steps[-1] < times["remerge done"]  # asked mid-generation, done after it
    assert times["other done"] > steps[-1]  # one engine, one job at a time: the other session queued
    assert other.last is not None and other.last.weights == {"ja": 1.0, "math": 1.0}
    ja_only = float((s.shared.model.get_input_embeddings().weight.detach().double()
                     + s.shared.vectors[0].tensors["model.embed_tokens.weight"].double()).sum())
    assert seen[0] == pytest.approx(ja_only, rel=1e-6)


def test_chatbot_history_parts_are_read_as_text():
    """Gradio 6's Chatbot sends each message as a list of text parts; the model must see the text only."""
    from conftest import make_tokenizer

    from workbench.chatting import prompt_ids

    tok = make_tokenizer()
    history = [{"role": "user", "content": [{"text": "hi", "type": "text"}], "metadata": None},
               {"role": "assistant", "content": [{"text": "yo", "type": "text"}], "options": None}]
    text = tok.decode(prompt_ids(tok, history, "fox", chat=True, max_tokens=100))
    assert "user: hi" in text and "assistant: yo" in text and "type" not in text


def test_lmeval_task_files_typed_in_the_ui_stay_in_the_workdir(tmp_path):
    """lm-eval task YAMLs can run code, so like objective files they must lie in the workdir."""
    from workbench.searching import checked_spec

    wd = tmp_path / "wd"
    (wd / "tasks").mkdir(parents=True)
    inside = (wd / "tasks" / "x.yaml").resolve()
    assert checked_spec("lmeval:tasks/x.yaml:acc=1, loss:ja=0.5", wd) == f"lmeval:{inside}:acc=1,loss:ja=0.5"
    assert checked_spec("lmeval:tasks/x.yaml", wd) == f"lmeval:{inside}"
    assert checked_spec("lmeval:arc_easy:acc_norm=2", wd) == "lmeval:arc_easy:acc_norm=2"  # a shipped task name
    assert checked_spec("loss:ja=1,acc:math=2", wd) == "loss:ja=1,acc:math=2"
    for bad in ("lmeval:../x.yaml", f"lmeval:{tmp_path / 'y.yaml'}:acc", "loss:ja=1,lmeval:/etc/t.yml=2"):
        with pytest.raises(WorkbenchError, match="lm-eval task .* is outside the workdir"):
            checked_spec(bad, wd)
    with pytest.raises(WorkbenchError, match="objective file"):
        checked_spec("../evil.py:score", wd)
