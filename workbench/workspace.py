"""The workbench's working directory: which base and vectors form the pool, opened once, read-only.

    from workbench.workspace import Workspace
    ws = Workspace("runs/demo")              # reads runs/demo/workbench.json, or infers a demo layout
    ws.has_pool()                            # False on a fresh directory
    ws.build_demo_pool(quick=True)           # CPT runs + vectors of the embedded world (minutes)
    shared = ws.pool()                       # SharedPool: base model, tokenizer, vectors, dev suite
    ws.add_vector("cpt/legal")               # checkpoint dir (extracted) or vector file, inside the workdir
    ws.add_eval("legal", "data/legal_dev.jsonl")  # one more dev set of the suite (Tune scores it too)
    ws.remove_eval("legal")                  # and gone again (the file stays); ws.user_evals() lists the added ones

The pool is described by ``<workdir>/workbench.json`` (``base``, ``vectors``, ``instruction``,
``eval``). ``eval`` lists the dev sets: embedded corpus names and ``NAME=PATH`` user files (a relative PATH is
relative to the workdir); absent, every embedded corpus is one. A non-empty list *replaces* that default, so
:meth:`Workspace.add_eval` writes the default names into it before adding a file. Without a manifest, a
directory holding ``vectors/*.safetensors`` (the layout ``optimer demo`` writes) is read as a pool over
``assets/base`` with ``vectors/instruct.safetensors`` as the instruction vector. A :class:`SharedPool` is an
immutable snapshot: changing the pool makes a new one, and sessions still holding the old one keep working with it.

Every path a user types is resolved against the workdir and refused if it leaves it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from optimer_lib.checkpoints.mapped import base_load_args
from optimer_lib.checkpoints.vectors import (
    DistributionVector,
    cosine_matrix,
    extract_vector,
    load_vector,
    save_vector,
)
from optimer_lib.data import assets_dir, embedded_corpora, load_eval_suite
from optimer_lib.engine import MergeEngine
from optimer_lib.engine.host_base import pool_base_on
from optimer_lib.errors import ConfigError, DataError, OptimerError, VectorError
from optimer_lib.merging.pool import load_checked
from optimer_lib.scoring.evaluate import EvalSuite

MANIFEST = "workbench.json"
# slots a slider release's dev sets are shared by unless told (optimer workbench --tune-slots; a GPU engine runs one)
DEFAULT_TUNE_SLOTS = 2
T = TypeVar("T")
CORPUS_SUFFIXES = (".txt", ".jsonl")  # a dev corpus file, optionally compressed (.gz, .xz): optimer_lib.data


class WorkbenchError(OptimerError):
    """A workbench action that cannot be done; the message says what to do instead."""


@dataclass
class SharedPool:
    """A read-only pool shared by every session; its :class:`MergeEngine` lends merged models to all of them.

    ``model`` is the engine's base: never merge into it (ask ``engine.lease(weights)`` for a merged model).
    """

    base_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    vectors: list[DistributionVector]
    instruction: DistributionVector | None
    suite: EvalSuite
    engine: MergeEngine
    version: int = 0
    tune_slots: int = DEFAULT_TUNE_SLOTS  # slots one Tune move's dev sets are shared by (tuning.score_stream)
    estimators: dict[tuple, Any] = field(default_factory=dict, repr=False)  # workbench.tuning, per scoring set
    _cos: tuple[list[str], list[list[float]]] | None = field(default=None, repr=False)
    _norms: dict[str, float] = field(default_factory=dict, repr=False)
    # what :meth:`per_suite` derived from the suite, by (what, scoring set, id(suite)); the suite is kept in the
    # value so its id is not reused
    derived: dict[tuple, tuple[EvalSuite, Any]] = field(default_factory=dict, repr=False)
    # (merge, scoring set) pairs being scored in the background for any session (prefetch, reference bars): a
    # page opened meanwhile must not score them again on another slot
    in_flight: set = field(default_factory=set, repr=False)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.vectors]

    def __deepcopy__(self, memo: dict) -> SharedPool:
        return self  # shared and read-only: copies would defeat the point

    def claim(self, key: Any) -> bool:
        """True (and ``key`` is now in flight) unless some session already scores ``key`` in the background."""
        with self.lock:
            if key in self.in_flight:
                return False
            self.in_flight.add(key)
            return True

    def release(self, key: Any) -> None:
        """``key``'s background score ended (scored, cancelled or failed)."""
        with self.lock:
            self.in_flight.discard(key)

    def per_suite(self, what: str, scoring: Any, make: Callable[[], T]) -> T:
        """``make()`` for this suite and scoring set, computed once (a scoring-cost line, the order of a move's dev
        sets): tokenising the sets is most of their work, and a page load or a slider move would repeat it."""
        suite, key = self.suite, (what, scoring, id(self.suite))
        hit = self.derived.get(key)
        if hit is not None and hit[0] is suite:
            return hit[1]
        value = make()
        self.derived[key] = (suite, value)
        return value

    def cosines(self) -> tuple[list[str], list[list[float]]]:
        """Names and pairwise cosine similarities of the distribution vectors (computed once)."""
        with self.lock:
            if self._cos is None:
                names, cos = cosine_matrix(self.vectors)
                self._cos = (names, cos.tolist())
            return self._cos

    def vector_rows(self) -> list[dict[str, Any]]:
        """One row per vector (instruction last): name, role, source, tokens, norm, file."""
        rows = []
        for role, vecs in (("distribution", self.vectors), ("instruction", [self.instruction])):
            for v in vecs:
                if v is not None:
                    with self.lock:  # not setdefault(name, v.norm()): that computes the norm on every call
                        if v.name not in self._norms:
                            self._norms[v.name] = v.norm()
                        norm = self._norms[v.name]
                    rows.append({"name": v.name, "role": role, "source": v.source or "-",
                                 "tokens": v.tokens_trained or "-", "norm": round(norm, 4),
                                 "file": str(v.path or "-")})
        return rows


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path.resolve())


class Workspace:
    """A workdir holding the pool description, vectors, search storage and exports.

    ``suite`` overrides the dev suite (tests pass a tiny one); otherwise the manifest's ``eval`` names
    or every embedded corpus are loaded (``dev`` split). ``device``/``dtype`` apply to every model; ``slots`` is
    the number of merged models the pool's engine may hold (default: 2 on CPU, 1 on an accelerator); ``base_on``
    where the engine keeps the base ("host", "device", None: automatic; :mod:`optimer_lib.engine.host_base`);
    ``tune_slots`` how many slots one Tune move's dev sets may be shared by (at most the engine's concurrency: 1 on a
    GPU; on a 2-core CPU the default 2 scores a move on both cores, BENCHMARKS.md).
    """

    def __init__(self, workdir: str | os.PathLike, *, suite: EvalSuite | None = None, device: str = "cpu",
                 dtype: str = "float32", slots: int | None = None, base_on: str | None = None,
                 tune_slots: int = DEFAULT_TUNE_SLOTS) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.device, self.dtype, self.slots, self.base_on = device, dtype, slots, base_on
        self.tune_slots = max(1, int(tune_slots))
        self._suite = suite
        self._pool: SharedPool | None = None
        self._version = 0
        self._lock = threading.RLock()

    def __deepcopy__(self, memo: dict) -> Workspace:
        return self  # one per workdir and process

    # -- paths ---------------------------------------------------------------------------------
    @property
    def storage_url(self) -> str:
        """The Optuna storage the workbench writes its searches to (CLI searches can share it)."""
        return f"sqlite:///{self.workdir / 'optuna.db'}"

    @property
    def exports_dir(self) -> Path:
        return self.workdir / "exports"

    def resolve(self, user_path: str | os.PathLike) -> Path:
        """``user_path`` (absolute or relative to the workdir), refused unless it lies inside the workdir."""
        raw = str(user_path).strip()
        if not raw:
            raise WorkbenchError("no path given: type a path relative to the workdir, e.g. cpt/ja")
        p = Path(raw).expanduser()
        p = (p if p.is_absolute() else self.workdir / p).resolve()
        if p != self.workdir and self.workdir not in p.parents:
            raise WorkbenchError(f"{raw!r} is outside the workdir {self.workdir}: copy it into the workdir first")
        return p

    # -- manifest ------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        """The pool description (read from workbench.json, or inferred from a demo layout), or None."""
        path = self.workdir / MANIFEST
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise WorkbenchError(f"{path} is not valid JSON ({exc}): fix or delete it") from exc
            return {"base": data.get("base"), "vectors": list(data.get("vectors") or []),
                    "instruction": data.get("instruction"), "eval": data.get("eval")}
        vecs = sorted((self.workdir / "vectors").glob("*.safetensors"))
        inst = self.workdir / "vectors" / "instruct.safetensors"
        dists = [str(p) for p in vecs if p != inst]
        if dists and (assets_dir() / "base" / "config.json").is_file():
            return {"base": str(assets_dir() / "base"), "vectors": dists,
                    "instruction": str(inst) if inst.is_file() else None, "eval": None}
        return None

    def _abs(self, p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else self.workdir / q

    def write_manifest(self, base: str | os.PathLike, vectors: Sequence[str | os.PathLike],
                       instruction: str | os.PathLike | None, eval_names: Sequence[str] | None = None) -> Path:
        """Write workbench.json (paths inside the workdir are stored relative to it).

        A relative path is read as relative to the workdir, as :meth:`pool` reads the manifest (never to the
        process's current directory): re-saving a manifest's own entries keeps them.
        """
        def rel(p: str | os.PathLike) -> str:
            return _rel(self._abs(str(p)), self.workdir)

        data = {"base": rel(base), "vectors": [rel(v) for v in vectors],
                "instruction": rel(instruction) if instruction else None,
                "eval": list(eval_names) if eval_names else None}
        path = self.workdir / MANIFEST
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
        return path

    def has_pool(self) -> bool:
        return self._pool is not None or self.manifest() is not None

    # -- pool ----------------------------------------------------------------------------------
    def pool(self) -> SharedPool:
        """The current pool, opened on first use; WorkbenchError when the workdir has none yet."""
        with self._lock:
            if self._pool is None:
                m = self.manifest()
                if m is None:
                    raise WorkbenchError(f"no pool in {self.workdir}: build the demo pool (Pool tab; in a notebook "
                                         "Workspace.build_demo_pool()) or add vectors and choose a base "
                                         "(Workspace.set_pool)")
                self._pool = self._open(m)
            return self._pool

    def _suite_for(self, eval_names: Sequence[str] | None) -> EvalSuite:
        """The dev suite: ``eval``'s corpora (every embedded one without it), plus its ``NAME=PATH`` user files
        (also on top of a ``suite`` given to the constructor)."""
        items = [str(i) for i in eval_names or []]
        files = [i for i in items if "=" in i]
        names = [i for i in items if "=" not in i] if items else embedded_corpora()
        try:
            if self._suite is not None:
                base = self._suite
            elif names:
                base = load_eval_suite(names, "dev")
            elif files:
                base = EvalSuite()
            else:
                raise WorkbenchError("no dev data: the embedded corpora are missing (build them with python -m "
                                     "optimer_lib.assets build --out DIR, then set OPTIMER_ASSETS=DIR) and "
                                     "workbench.json names no 'eval' corpora (NAME=PATH)")
            user = load_eval_suite([self._corpus_item(i) for i in files], "dev") if files else EvalSuite()
        except (ConfigError, DataError) as exc:
            raise WorkbenchError(f"{MANIFEST} 'eval': {exc}") from exc
        return EvalSuite(texts={**base.texts, **user.texts}, qa={**base.qa, **user.qa}) if files else base

    def _corpus_item(self, item: str) -> str:
        name, _, path = item.partition("=")
        return f"{name.strip()}={self._abs(path.strip())}"

    def add_eval(self, name: str, user_path: str) -> SharedPool:
        """Add the dev corpus ``NAME=PATH`` to the pool's suite (kept in workbench.json's ``eval``); the new pool.

        PATH is a ``.txt`` (documents separated by blank lines) or ``.jsonl`` (a ``text`` field per line) file,
        optionally ``.gz``/``.xz``, inside the workdir; its documents are read whole, as every split. It adds to the
        current dev sets (a Tune scoring of every set scores it; a QA file, all ``Question: ...\nAnswer: X``,
        also gives ``acc:NAME``). The models and the engine are kept: only the suite changes.
        """
        name = (name or "").strip()
        if not name:
            raise WorkbenchError("no name given: name the dev set, e.g. legal (it becomes the metric loss:legal)")
        path = self.resolve(user_path)
        kind = path.with_suffix("").suffix if path.suffix in (".gz", ".xz") else path.suffix
        if kind not in CORPUS_SUFFIXES:
            raise WorkbenchError(f"{user_path!r} is not a dev corpus: give a .txt or .jsonl file (optionally .gz or "
                                 ".xz)")
        if not path.is_file():
            raise WorkbenchError(f"{user_path!r} does not exist in the workdir {self.workdir}")
        with self._lock:
            current = self.pool()
            if name in current.suite.names():
                raise WorkbenchError(f"the suite has a dev set {name!r} already: choose another name")
            try:
                extra = load_eval_suite([f"{name}={path}"], "dev")
            except (ConfigError, DataError) as exc:
                raise WorkbenchError(str(exc)) from exc
            m = self.manifest() or {}
            items = list(m.get("eval") or ([] if self._suite is not None else embedded_corpora()))
            self.write_manifest(m.get("base") or current.base_dir, m.get("vectors") or [], m.get("instruction"),
                                [*items, f"{name}={_rel(path, self.workdir)}"])
            self._version += 1
            suite = EvalSuite(texts={**current.suite.texts, **extra.texts}, qa={**current.suite.qa, **extra.qa})
            self._pool = dataclasses.replace(current, suite=suite, version=self._version, estimators={},
                                             lock=threading.RLock())
            return self._pool

    def user_evals(self) -> dict[str, str]:
        """The dev corpora added with :meth:`add_eval` (``eval``'s ``NAME=PATH`` entries): name -> path as stored."""
        items = [str(i).partition("=") for i in (self.manifest() or {}).get("eval") or []]
        return {name.strip(): path.strip() for name, sep, path in items if sep}

    def remove_eval(self, name: str) -> SharedPool:
        """Remove the dev corpus ``name`` added with :meth:`add_eval` from the suite and workbench.json; the new pool.

        Only added corpora (``NAME=PATH`` entries) can go: the embedded dev sets are the pool's common yardstick
        (leave them out of Tune's scoring set instead). The file stays where it is; models, engine and Tune weights
        are kept. When only the embedded names :meth:`add_eval` wrote remain, ``eval`` is reset to the default.
        """
        name = (name or "").strip()
        with self._lock:
            current = self.pool()
            added = self.user_evals()
            if name not in added:
                if name in current.suite.names():
                    raise WorkbenchError(f"{name!r} is a built-in dev set, not an added corpus: untick it in Tune's "
                                         "scoring set instead")
                raise WorkbenchError(f"no added dev corpus {name!r}: the added ones are {', '.join(added) or 'none'}")
            m = self.manifest() or {}
            items = [str(i) for i in m.get("eval") or [] if str(i).partition("=")[0].strip() != name]
            if self._suite is None and items == embedded_corpora():
                items = []  # what add_eval wrote to keep the default: the default again
            self.write_manifest(m.get("base") or current.base_dir, m.get("vectors") or [], m.get("instruction"),
                                items)
            self._version += 1
            suite = current.suite
            suite = EvalSuite(texts={k: v for k, v in suite.texts.items() if k != name},
                              qa={k: v for k, v in suite.qa.items() if k != name})
            if not (suite.texts or suite.qa):  # an older manifest's only file: no list means every embedded corpus
                suite = self._suite_for(items)
            self._pool = dataclasses.replace(current, suite=suite, version=self._version, estimators={},
                                             lock=threading.RLock())
            return self._pool

    def _open(self, m: dict[str, Any]) -> SharedPool:
        if not m.get("base"):
            raise WorkbenchError("the pool has no base model: choose one in the Pool tab (Workspace.set_pool)")
        if not m.get("vectors"):
            raise WorkbenchError("cannot open the pool: the pool has no distribution vector: add one in the Pool tab "
                                 "(Workspace.set_pool)")
        base_dir = self._abs(m["base"])
        inst = self._abs(m["instruction"]) if m.get("instruction") else None
        files = [self._abs(p) for p in m["vectors"]]
        try:  # a host base is loaded on the CPU (memory-mapped) and only the engine's slots go to the device
            base_on = pool_base_on(self.base_on, base_dir, files, inst, device=self.device, dtype=self.dtype,
                                   slots=self.slots)
            where, dt = base_load_args(base_on, self.device, self.dtype)
            model, tokenizer, vectors, instruction = load_checked(base_dir, files, instruction=inst, device=where,
                                                                  dtype=dt)
        except VectorError as exc:
            raise WorkbenchError(str(exc)) from exc
        self._version += 1
        # trim_memory: a served workspace scores in many Gradio worker threads, each of which would keep what it freed
        engine = MergeEngine(model, tokenizer, vectors, instruction=instruction, max_slots=self.slots, base_on=base_on,
                             device=self.device, trim_memory=True)
        return SharedPool(base_dir, model, tokenizer, vectors, instruction, self._suite_for(m.get("eval")),
                          engine, version=self._version, tune_slots=self.tune_slots)

    def set_pool(self, base: str | os.PathLike, vectors: Sequence[str | os.PathLike],
                 instruction: str | os.PathLike | None) -> SharedPool:
        """Open a new pool (validated first: a bad choice leaves the current one in place), then save it."""
        old = self.manifest() or {}
        m = {"base": str(base), "vectors": [str(v) for v in vectors],
             "instruction": str(instruction) if instruction else None, "eval": old.get("eval")}
        with self._lock:
            shared = self._open(m)
            self.write_manifest(base, vectors, instruction, m["eval"])
            self._pool = shared
            return shared

    def vector_files(self) -> list[Path]:
        """Vector files the Pool tab offers: ``vectors/*.safetensors`` plus those of the manifest."""
        m = self.manifest() or {}
        listed = [self._abs(p) for p in [*m.get("vectors", []), m.get("instruction")] if p]
        found = sorted((self.workdir / "vectors").glob("*.safetensors"))
        return list(dict.fromkeys(p.resolve() for p in [*listed, *found]))

    def base_candidates(self) -> list[Path]:
        """Checkpoint dirs offered as base: the manifest's, ``assets/base``, and HF dirs in the workdir."""
        m = self.manifest() or {}
        out = [self._abs(m["base"])] if m.get("base") else []
        if (assets_dir() / "base" / "config.json").is_file():
            out.append(assets_dir() / "base")
        for cfg in sorted(self.workdir.glob("*/config.json")) + sorted(self.workdir.glob("*/*/config.json")):
            out.append(cfg.parent)
        return list(dict.fromkeys(p.resolve() for p in out))

    def add_vector(self, user_path: str, name: str | None = None) -> SharedPool:
        """Add a vector file or a checkpoint directory (its vector is extracted into ``vectors/``)."""
        path = self.resolve(user_path)
        current = self.pool()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise WorkbenchError(f"{user_path!r} is a directory without config.json: give a Hugging Face "
                                     "checkpoint directory or a .safetensors vector file")
            vname = (name or path.name).strip()
            out = self.workdir / "vectors" / f"{vname}.safetensors"
            if out.exists():
                raise WorkbenchError(f"{_rel(out, self.workdir)} exists: choose another name")
            info = path / "training.json"
            tokens = json.loads(info.read_text()).get("tokens_trained") if info.is_file() else None
            vec = extract_vector(current.base_dir, path, name=vname, source=str(path), tokens_trained=tokens)
            path = save_vector(vec, out)
        elif not path.is_file():
            raise WorkbenchError(f"{user_path!r} does not exist in the workdir {self.workdir}")
        elif path.suffix != ".safetensors":  # e.g. a corpus typed into the wrong box: not "a corrupt vector"
            raise WorkbenchError(f"{user_path!r} is not a vector: give a checkpoint directory or a .safetensors "
                                 "vector file (a dev corpus goes under \"add a dev corpus\")")
        elif name and load_vector(path).name != name:
            raise WorkbenchError(f"{user_path!r} holds vector {load_vector(path).name!r}; leave the name empty "
                                 "or re-extract it under the new name")
        m = self.manifest() or {}
        paths = [*(m.get("vectors") or []), str(path)]
        return self.set_pool(m.get("base") or current.base_dir, paths, m.get("instruction"))

    def build_demo_pool(self, quick: bool = False) -> SharedPool:
        """Train the demo's CPT models and extract their vectors here (cached), then open that pool."""
        from optimer_lib.demo import DemoConfig, build_pool

        if not (assets_dir() / "base" / "config.json").is_file():
            raise WorkbenchError(f"the embedded world is missing ({assets_dir()}/base): build it with "
                                 "`python -m optimer_lib.assets build --out DIR` and set OPTIMER_ASSETS=DIR")
        cfg = DemoConfig.quick(self.workdir) if quick else DemoConfig(workdir=self.workdir)
        paths, inst = build_pool(cfg)
        return self.set_pool(assets_dir() / "base", paths, inst)
