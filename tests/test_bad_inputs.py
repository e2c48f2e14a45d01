"""Bad inputs to the ``optimer`` command: refused up front, one ``error:`` line, exit 2, nothing written.

Each case runs the real command line in its own process, as a user would, like ``tests/test_cli.py``.
To keep ~40 processes cheap, they are forked from one helper process that imported torch, transformers
and ``optimer_lib`` once (set ``OPTIMER_TEST_NO_FORK=1`` to start every case with a fresh interpreter
instead); a forked case has its own exit status, stdout and stderr, and an uncaught exception prints
its traceback exactly as the interpreter would.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model, make_tokenizer, perturbed

OPTIMER = [sys.executable, "-m", "optimer_lib.cli"]
ROOT = Path(__file__).resolve().parent.parent
MARKER = "ran.txt"  # written by the "evil" code of the remote-code and pickle checkpoints if it ever runs

_SERVER = r"""
import json, os, sys, traceback
import torch, transformers  # noqa: F401  (imported once, before any fork)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import optimer_lib.cli, optimer_lib.merging.pool, optimer_lib.training.train  # noqa: F401
import optimer_lib.merging.export, optimer_lib.search.study  # noqa: F401
import optimer_lib.scoring.objectives, optimer_lib.data, optimer_lib.merging.methods  # noqa
import optimer_lib.checkpoints.vectors, optimer_lib.checkpoints.models  # noqa
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        rc = 1
        try:
            for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(f, fd)
                os.close(f)
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            sys.argv = ["optimer", *req["argv"]]
            try:
                rc = optimer_lib.cli.main(req["argv"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                rc = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPTIMER_DEBUG": "", "PYTHONPATH": str(ROOT), **extra}


class _Runner:
    """Runs ``optimer ARGS`` in a fresh process (forked from a warm helper where possible)."""

    def __init__(self, scratch: Path) -> None:
        self.scratch, self.n, self.proc = scratch, 0, None
        if hasattr(os, "fork") and not os.environ.get("OPTIMER_TEST_NO_FORK"):
            self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
            assert self._readline(120) == "ready"

    def _readline(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"optimer did not finish within {timeout} s"
        return self.proc.stdout.readline().strip()

    def __call__(self, *args: object, cwd: Path | None = None, ok: bool = False, **env: str) -> SimpleNamespace:
        argv, cwd = [str(a) for a in args], cwd or self.scratch
        if self.proc is None:
            r = subprocess.run([*OPTIMER, *argv], capture_output=True, text=True, env=_env(**env), cwd=cwd,
                               timeout=300)
            res = SimpleNamespace(returncode=r.returncode, stdout=r.stdout, stderr=r.stderr)
        else:
            self.n += 1
            out, err = self.scratch / f".out{self.n}", self.scratch / f".err{self.n}"
            req = {"argv": argv, "cwd": str(cwd), "env": _env(**env), "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            rc = json.loads(self._readline(300))["rc"]
            res = SimpleNamespace(returncode=rc, stdout=out.read_text(), stderr=err.read_text())
            out.unlink()
            err.unlink()
        if ok:
            assert res.returncode == 0, res.stderr[-3000:]
        return res

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = _Runner(tmp_path_factory.mktemp("runner"))
    yield r
    r.close()


# -- the world of bad inputs: built once per module ----------------------------------------------------------
def _save(model, tok, d: Path) -> Path:
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _rewrite_weights(d: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    state = load_file(f)
    edit(state)
    save_file(state, f, metadata={"format": "pt"})


def _vector_file(src: Path, dst: Path, edit) -> Path:
    """A copy of vector ``src`` whose tensors ``edit`` changed, metadata kept (so only the change is wrong)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, dst, metadata=meta)
    return dst


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from optimer_lib.checkpoints.vectors import extract_vector, save_vector

    w = tmp_path_factory.mktemp("world")
    tok = make_tokenizer()
    base = make_model("llama")
    _save(base, tok, w / "base")
    tuned = perturbed(base, 0.02, seed=1)
    _save(tuned, tok, w / "tuned")
    save_vector(extract_vector(base, tuned, name="v"), w / "v.safetensors")
    other = make_model("llama", seed=7)  # another base of the same architecture
    save_vector(extract_vector(other, perturbed(other, 0.02, seed=2), name="other"), w / "other.safetensors")
    big = make_model("llama", vocab_size=330)  # a base with a larger vocabulary
    _save(perturbed(big, 0.02, seed=3), tok, w / "big_tuned")
    save_vector(extract_vector(big, perturbed(big, 0.02, seed=3), name="big"), w / "big.safetensors")

    def poison(t: dict) -> None:
        next(v for v in t.values() if v.is_floating_point()).view(-1)[3] = float("nan")

    _vector_file(w / "v.safetensors", w / "nan.safetensors", poison)
    _vector_file(w / "v.safetensors", w / "extra.safetensors",
                 lambda t: t.update({"model.layers.7.mlp.zzz.weight": torch.zeros(2, 2)}))
    raw = (w / "v.safetensors").read_bytes()
    (w / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (w / "junk.safetensors").write_bytes(os.urandom(4096))

    nan_tuned = perturbed(base, 0.02, seed=4)
    with torch.no_grad():
        nan_tuned.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    _save(nan_tuned, tok, w / "nan_tuned")
    shutil.copytree(w / "base", w / "trunc_base")
    f = w / "trunc_base" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:300])
    shutil.copytree(w / "base", w / "renamed")
    _rewrite_weights(w / "renamed", lambda s: s.update(
        {"model.layers.0.mlp.up_projX.weight": s.pop("model.layers.0.mlp.up_proj.weight")}))
    shutil.copytree(w / "base", w / "vocab_config")  # config says 330 tokens, the weights hold 320
    cfg = json.loads((w / "vocab_config" / "config.json").read_text())
    (w / "vocab_config" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 330}))

    shutil.copytree(w / "base", w / "remote")  # architecture as code in the folder: must never run
    cfg = json.loads((w / "remote" / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (w / "remote" / "config.json").write_text(json.dumps(cfg))
    (w / "remote" / "evil.py").write_text(f"open({str(w / MARKER)!r}, 'w').write('remote code ran')\n")
    shutil.copytree(w / "base", w / "pickled")  # a pickle checkpoint that runs a command when unpickled
    (w / "pickled" / "model.safetensors").unlink()
    torch.save({**base.state_dict(), "evil": _Evil(w / MARKER)}, w / "pickled" / "pytorch_model.bin")

    (w / "notes.txt").write_text("\n\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(60)))
    (w / "empty.txt").write_text("\n\n  \n")
    (w / "tiny.txt").write_text("hi")
    shutil.copytree(w / "tuned", w / "finished")  # what `optimer train` leaves behind
    (w / "finished" / "training.json").write_text(json.dumps({"tokens_trained": 256}))
    (w / "searched").mkdir()  # a search workdir holding the result of study "optimer"
    (w / "searched" / "best.json").write_text(json.dumps(
        {"study": "optimer", "storage": f"sqlite:///{(w / 'searched' / 'optuna.db').resolve()}", "weights": {}}))
    return w


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


SEARCH = ["search", "--base", "{w}/base", "--eval", "notes={w}/notes.txt", "--objective", "loss:notes",
          "--trials", "2", "--search-limit", "2", "--top-k", "0", "--workdir", "{o}"]
MERGE = ["merge", "--base", "{w}/base", "--out", "{o}"]
EXTRACT = ["vector", "extract", "--base", "{w}/base", "--out", "{o}"]
TRAIN = ["train", "--base", "{w}/base", "--out", "{o}", "--tokens", "256", "--batch-size", "4", "--seq-len", "16",
         "--device", "cpu"]


def _with(cmd: list[str], *args: object, drop: str | None = None) -> list[str]:
    """``cmd`` plus ``args``, where a later ``--flag value`` replaces the command's own ``--flag``."""
    out, args = list(cmd), [str(a) for a in args]
    flags = {a for a in args if a.startswith("--")}
    for flag in flags & set(out):
        i = out.index(flag)
        del out[i:i + 2]
    if drop in out:
        i = out.index(drop)
        del out[i:i + 2]
    return out + list(args)


# (id, argv, fragments that the one error line must contain)
CASES = [
    ("base-fingerprint-merge", _with(MERGE, "--vector", "{w}/other.safetensors=0.3"),
     ["different base", "--allow-base-mismatch"]),
    ("base-fingerprint-search", _with(SEARCH, "--vector", "{w}/other.safetensors"), ["different base"]),
    ("vocab-extract", _with(EXTRACT, "--tuned", "{w}/big_tuned"),
     ["model.embed_tokens.weight", "resize_token_embeddings"]),
    ("vocab-merge", _with(MERGE, "--vector", "{w}/big.safetensors=0.3"),
     ["model.embed_tokens.weight", "resize_token_embeddings"]),
    ("vocab-checkpoint", _with(MERGE, "--base", "{w}/vocab_config", "--vector", "{w}/v.safetensors=0.3"),
     ["model.embed_tokens.weight", "resize_token_embeddings"]),
    ("nan-vector", _with(MERGE, "--vector", "{w}/nan.safetensors=0.3"), ["NaN or Inf"]),
    ("nan-checkpoint-extract", _with(EXTRACT, "--tuned", "{w}/nan_tuned"), ["NaN or Inf", "up_proj"]),
    ("nan-checkpoint-train", _with(TRAIN, "--base", "{w}/nan_tuned", "--data", "{w}/notes.txt"), ["NaN or Inf"]),
    ("truncated-vector", _with(MERGE, "--vector", "{w}/trunc.safetensors=0.3"), ["corrupt or truncated"]),
    ("corrupt-vector", _with(SEARCH, "--vector", "{w}/junk.safetensors"), ["corrupt or truncated"]),
    ("truncated-checkpoint", _with(MERGE, "--base", "{w}/trunc_base", "--vector", "{w}/v.safetensors=0.3"),
     ["truncated or corrupt"]),
    ("unknown-tensor-vector", _with(MERGE, "--vector", "{w}/extra.safetensors=0.3"),
     ["model.layers.7.mlp.zzz.weight", "lacks"]),
    ("unknown-tensor-checkpoint", _with(EXTRACT, "--tuned", "{w}/renamed"), ["up_projX", "lacks"]),
    ("missing-vector", _with(SEARCH, "--vector", "{w}/nope.safetensors"), ["does not exist"]),
    ("missing-base", _with(MERGE, "--base", "{w}/nope", "--vector", "{w}/v.safetensors=0.3"), ["does not exist"]),
    ("missing-tuned", _with(EXTRACT, "--tuned", "{w}/nope"), ["does not exist"]),
    ("missing-data", _with(TRAIN, "--data", "{w}/nope.txt"), ["no such file"]),
    ("missing-eval", _with(SEARCH, "--vector", "{w}/v.safetensors", "--eval", "notes={w}/nope.txt"),
     ["no such file"]),
    ("malformed-vector-weight", _with(MERGE, "--vector", "{w}/v.safetensors=abc"), ["--vector", "not a number"]),
    ("malformed-vector-nan", _with(MERGE, "--vector", "{w}/v.safetensors=nan"), ["--vector", "finite"]),
    ("malformed-vector-nofile", _with(MERGE, "--vector", "=0.3"), ["--vector", "file is missing"]),
    ("malformed-vector-noweight", _with(MERGE, "--vector", "{w}/v.safetensors"), ["FILE=WEIGHT"]),
    ("malformed-objective-weight", _with(SEARCH, "--vector", "{w}/v.safetensors", "--objective", "loss:notes=x"),
     ["--objective", "not a number"]),
    ("malformed-objective-kind", _with(SEARCH, "--vector", "{w}/v.safetensors", "--objective", "lost:notes"),
     ["No module named 'lost'", "metric kinds are loss"]),
    ("malformed-objective-module", _with(SEARCH, "--vector", "{w}/v.safetensors", "--objective", "no_such_mod_q:f"),
     ["cannot import", "no_such_mod_q"]),
    ("malformed-objective-empty", _with(SEARCH, "--vector", "{w}/v.safetensors", "--objective", " "),
     ["empty --objective"]),
    ("malformed-bounds", _with(SEARCH, "--vector", "{w}/v.safetensors", "--bounds", "0:1:2"), ["LOW:HIGH"]),
    ("malformed-bounds-order", _with(SEARCH, "--vector", "{w}/v.safetensors", "--bounds", "v=1:0"), ["LOW < HIGH"]),
    ("malformed-bounds-name", _with(SEARCH, "--vector", "{w}/v.safetensors", "--bounds", "zz=0:1"),
     ["unknown vector 'zz'"]),
    ("malformed-data-ratio", _with(TRAIN, "--data", "ja=lots"), ["bad --data"]),
    ("malformed-data-name", _with(TRAIN, "--data", "=0.5,ja=0.5"), ["bad --data", "name is missing"]),
    ("empty-dataset-train", _with(TRAIN, "--data", "{w}/empty.txt"), ["is empty"]),
    ("tiny-dataset-train", _with(TRAIN, "--data", "{w}/tiny.txt"), ["too small", "--seq-len"]),
    ("empty-dataset-search", _with(SEARCH, "--vector", "{w}/v.safetensors", "--eval", "notes={w}/empty.txt"),
     ["is empty"]),
    ("remote-code-train", _with(TRAIN, "--base", "{w}/remote", "--data", "{w}/notes.txt"), ["--trust-remote-code"]),
    ("remote-code-extract", _with(EXTRACT, "--tuned", "{w}/remote"), ["--trust-remote-code"]),
    ("remote-code-merge", _with(MERGE, "--base", "{w}/remote", "--vector", "{w}/v.safetensors=0.3"),
     ["--trust-remote-code"]),
    ("remote-code-search", _with(SEARCH, "--base", "{w}/remote", "--vector", "{w}/v.safetensors"),
     ["--trust-remote-code"]),
    ("pickle-checkpoint", _with(MERGE, "--base", "{w}/pickled", "--vector", "{w}/v.safetensors=0.3"),
     ["could run code"]),
    ("train-onto-finished-run", _with(TRAIN, "--data", "{w}/notes.txt", "--out", "{w}/finished"),
     ["finished run", "--force"]),
    ("extract-onto-existing-vector", _with(EXTRACT, "--tuned", "{w}/tuned", "--out", "{w}/v.safetensors"),
     ["--force"]),
    ("search-onto-other-study", _with(SEARCH, "--vector", "{w}/v.safetensors", "--workdir", "{w}/searched",
                                      "--study", "another"), ["another search", "--force"]),
    ("workdir-is-a-file", _with(SEARCH, "--vector", "{w}/v.safetensors", "--workdir", "{w}/notes.txt"),
     ["--workdir", "is a file"]),
    ("out-under-a-file", _with(MERGE, "--vector", "{w}/v.safetensors=0.3", "--out", "{w}/notes.txt/merged"),
     ["--out", "which is a file"]),
    ("export-gguf-missing-checkpoint", ["export-gguf", "{w}/nope", "{o}.gguf"], ["does not exist", "never contacted"]),
    ("vector-info-two-models", ["vector", "info", "{w}/v.safetensors", "{w}/big.safetensors"],
     ["different models", "embed_tokens"]),
    ("plan-vector-of-other-architecture", ["plan", "--base", "{w}/base", "--vector", "{w}/extra.safetensors"],
     ["zzz", "lacks"]),
    ("plan-vector-of-other-vocabulary", ["plan", "--base", "{w}/base", "--vector", "{w}/big.safetensors"],
     ["embed_tokens", "resize_token_embeddings"]),
    ("workbench-port-out-of-range", ["workbench", "--workdir", "{o}", "--port", "70000"], ["--port", "65535"]),
    ("workbench-threads-zero", ["workbench", "--workdir", "{o}", "--threads", "0"], ["--threads"]),
    ("workbench-base-alone", ["workbench", "--workdir", "{o}", "--base", "{w}/base"], ["--base and --vector"]),
    ("workbench-vector-of-other-vocabulary", ["workbench", "--workdir", "{o}", "--base", "{w}/base", "--vector",
                                              "{w}/big.safetensors"], ["embed_tokens"]),
    ("workbench-missing-vector", ["workbench", "--workdir", "{o}", "--base", "{w}/base", "--vector",
                                  "{w}/nope.safetensors"], ["does not exist"]),
    ("merge-bad-shard-size", _with(MERGE, "--vector", "{w}/v.safetensors=0.3", "--shard-size", "5XB"),
     ["bad shard size '5XB'"]),
    ("extract-bad-shard-size", _with(EXTRACT, "--tuned", "{w}/tuned", "--shard-size", "lots"), ["bad shard size"]),
    ("search-zero-documents", _with(SEARCH, "--vector", "{w}/v.safetensors", "--search-limit", "0"),
     ["search_limit must be >= 1"]),
]


@pytest.mark.parametrize("argv, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_line_and_nothing_written(run, world, tmp_path, argv, fragments):
    case = tmp_path / "case"  # the working directory; {o} is the output the command was asked to write
    case.mkdir()
    before = _snapshot(world)
    r = run(*[a.format(w=world, o=case / "out") for a in argv], cwd=case)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert list(case.iterdir()) == [], f"wrote {list(case.iterdir())}"
    assert _snapshot(world) == before, "changed files of the inputs"
    assert not (world / MARKER).exists(), "untrusted code ran"


def test_debug_shows_the_traceback(run, world, tmp_path):
    r = run("vector", "info", world / "junk.safetensors", OPTIMER_DEBUG="1")
    assert r.returncode == 2 and "Traceback" in r.stderr and "error: vector file is corrupt" in r.stderr


def test_overrides_do_what_they_say(run, world, tmp_path):
    """--allow-base-mismatch merges a foreign vector; --force re-trains a finished run."""
    merge = _with(MERGE, "--vector", "{w}/other.safetensors=0.3", "--allow-base-mismatch")
    run(*[a.format(w=world, o=tmp_path / "m") for a in merge], ok=True)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    out = tmp_path / "finished"
    shutil.copytree(world / "finished", out)
    r = run(*[a.format(w=world, o=out) for a in _with(TRAIN, "--data", "{w}/notes.txt", "--force")], ok=True)
    assert "saved" in r.stdout and json.loads((out / "training.json").read_text())["tokens_trained"] == 256
    assert json.loads((out / "training.json").read_text())["final_loss"] > 0  # the new run's, not the fake


def test_trust_remote_code_flag_allows_custom_architectures(run, world, tmp_path):
    """A folder whose architecture is code loads only with --trust-remote-code (here: harmless code)."""
    d = tmp_path / "custom"
    shutil.copytree(world / "base", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="custom_llama", auto_map={"AutoConfig": "custom.CustomConfig",
                                                    "AutoModelForCausalLM": "custom.CustomModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "custom.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    modules = {"HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    args = _with(EXTRACT, "--base", d, "--tuned", d, "--out", tmp_path / "v.safetensors")
    r = run(*args, **modules)
    assert r.returncode == 2 and "--trust-remote-code" in r.stderr
    run(*args, "--trust-remote-code", ok=True, **modules)
    assert (tmp_path / "v.safetensors").is_file()


def test_train_out_checks(tmp_path):
    """A resume point continues; an empty or missing folder is fine; anything else needs --force."""
    from optimer_lib.errors import OptimerError
    from optimer_lib.training.train import check_out_dir

    check_out_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    (tmp_path / "run" / "resume").mkdir(parents=True)
    (tmp_path / "run" / "resume" / "state.pt").write_bytes(b"x")
    (tmp_path / "run" / "config.json").write_text("{}")
    check_out_dir(tmp_path / "run")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(OptimerError, match="not empty"):
        check_out_dir(tmp_path / "notes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OptimerError, match="is a file"):
        check_out_dir(tmp_path / "file", force=True)


def test_every_problem_of_a_command_line_is_reported_at_once(run, world, tmp_path):
    """A merge with five mistakes names all five (and a search its own), in one error, before anything loads."""
    r = run("merge", "--base", world / "nope", "--vector", f"{world}/missing.safetensors=0.3", "--vector",
            f"{world}/v.safetensors=abc", "--method", "foo", "--out", world / "notes.txt", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: 5 problems:"), r.stderr
    for fragment in ("--out", "is a file", "not a number", "missing.safetensors' does not exist",
                     "unknown merge method 'foo'", "checkpoint directory", "nope"):
        assert fragment in r.stderr, fragment
    r = run(*[a.format(w=world, o=tmp_path / "s") for a in
              _with(SEARCH, "--vector", "{w}/v.safetensors", "--trials", "0", "--objective", "loss:xx,,",
                    "--time-budget", "5q")], cwd=tmp_path)
    assert r.stderr.startswith("error: 3 problems:"), r.stderr
    for fragment in ("unknown distribution 'xx'", "stray comma", "trials must be >= 1", "bad duration '5q'"):
        assert fragment in r.stderr, fragment
    assert r.stderr.count("stray comma") == 1  # two stray commas, one problem
    assert list(tmp_path.iterdir()) == [], "wrote something"


def test_workbench_port_in_use_is_refused_before_the_pool_loads(run, world, tmp_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = run("workbench", "--workdir", tmp_path / "wb", "--port", port, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}: another program uses that port; choose another --port" in r.stderr
    assert "OptiMer workbench on" not in r.stdout  # no URL announced for a server that never starts
    assert not (tmp_path / "wb").exists()


def test_unwritable_locations_are_named_before_any_work(tmp_path, monkeypatch):
    """check_writable: a file in the way, a folder under a file, and no permission (faked: tests may run as root,
    whom the kernel lets write anywhere)."""
    from optimer_lib.errors import ConfigError
    from optimer_lib.fileio import check_writable

    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    assert check_writable(tmp_path / "new" / "deeper", flag="--workdir") == tmp_path / "new" / "deeper"
    check_writable(tmp_path / "d" / "x.gguf", flag="OUT", kind="file")
    check_writable(tmp_path / "d", flag="--out", kind="any")
    with pytest.raises(ConfigError, match="--workdir .* is a file: give a folder"):
        check_writable(tmp_path / "f", flag="--workdir")
    with pytest.raises(ConfigError, match="OUT .* is a folder: give a file name"):
        check_writable(tmp_path / "d", flag="OUT", kind="file")
    with pytest.raises(ConfigError, match="lies under '.*/f', which is a file"):
        check_writable(tmp_path / "f" / "a" / "b", flag="--out")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "d" else real_access(p, mode))
    with pytest.raises(ConfigError, match="may not write to '.*/d': choose a location you can write to"):
        check_writable(tmp_path / "d" / "new" / "run", flag="--workdir")
    with pytest.raises(ConfigError, match="may not write to"):
        check_writable(tmp_path / "d" / "x.gguf", flag="OUT", kind="file")

