"""lm-evaluation-harness tasks as objective metrics, scored on the live (in-memory) merged model.

    pip install 'optimer-workbench[lmeval]'
    optimer search --base DIR --vector ja.safetensors --vector math.safetensors \\
        --objective 'lmeval:examples/lmeval/arith_mc.yaml:acc_norm=1,loss:ja=0.5' --search-limit 32

    from optimer_lib.scoring.lmeval import LMEvalScorer, load_task
    task = load_task("examples/lmeval/arith_mc.yaml")   # or DIR, DIR/NAME, or a task shipped with lm-eval
    scorer = LMEvalScorer()                             # one HFLM wrapper per model object, reused
    scorer.evaluate(task, model, tokenizer, limit=20)   # {"acc": 0.45, "acc_norm": 0.4}

An objective term reads ``lmeval:SOURCE[:METRIC]`` (``optimer_lib.scoring.objectives`` parses it; weights
``=W`` as for every term). SOURCE is a task YAML file (``dataset_path: json`` with
``dataset_kwargs: {data_files: ...}`` relative to the YAML runs anywhere), a directory of task YAMLs
that defines one task (or one group), ``DIR/NAME`` for the task or group NAME among the YAMLs of DIR,
or the name of a task that ships with lm-eval. METRIC (``acc``, ``acc_norm``, ``exact_match/FILTER``
for a filter other than ``none``...) defaults to the task's first metric. Metrics lm-eval marks
higher-is-better enter an objective negated, like ``acc:``. ``limit`` (the search fidelity) is
lm-eval's: the first N documents of each task.

Nothing is downloaded: loading and scoring run with the Hugging Face hub and ``datasets`` switched to
offline mode (process-wide while they run). A local-data task always works; a task that ships with
lm-eval works only if its dataset is already in the local Hugging Face cache.

The model is wrapped once in ``lm_eval.models.huggingface.HFLM(pretrained=model)``, which keeps a
reference to it, not a copy: the resident merger's in-place rewrite of each trial is what is scored.
Tasks are loaded once per process (per source, until the YAML changes) and re-used by every
evaluation; their few-shot sampler is re-seeded before each one, so every trial sees the same prompts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimer_lib.errors import ConfigError, DataError, MissingDependencyError

INSTALL_HINT = "pip install 'optimer-workbench[lmeval]'"
PREFIX = "lmeval"
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
_METRIC = re.compile(r"^[A-Za-z_]\w*(/[\w.-]+)?$")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_global_lock = threading.RLock()  # offline() and _quiet() change process-wide state: one thread at a time
_cache_lock = threading.Lock()
_task_cache: dict[tuple[str, int], LMEvalTask] = {}


def require_lm_eval() -> None:
    """Import lm-eval and its Hugging Face backend, or raise MissingDependencyError naming the extra."""
    try:
        import lm_eval  # noqa: F401
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise MissingDependencyError(f"lm-eval objectives need lm-evaluation-harness and its Hugging Face backend "
                                     f"({missing} is not importable): {INSTALL_HINT}") from exc


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face hub and ``datasets`` offline while the block runs (env variables and the live flags)."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    with _global_lock:
        env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
        flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                 (hub_constants, "HF_HUB_OFFLINE")]
        saved = [(mod, name, getattr(mod, name)) for mod, name in flags if hasattr(mod, name)]
        os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
        for mod, name, _ in saved:
            setattr(mod, name, True)
        try:
            yield
        finally:
            for mod, name, value in saved:
                setattr(mod, name, value)
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@contextlib.contextmanager
def _quiet(level: int = logging.WARNING) -> Iterator[None]:
    """lm-eval's INFO logs and progress bars (and those of ``datasets``) off: a search calls it once per trial."""
    import datasets.utils as datasets_utils
    import lm_eval.api.task as task_module
    from tqdm import tqdm

    logger = logging.getLogger("lm_eval")
    with _global_lock:
        old_level, old_tqdm = logger.level, getattr(task_module, "tqdm", None)
        bars = (not datasets_utils.are_progress_bars_disabled()
                and os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") is None)  # the variable has priority
        logger.setLevel(level)
        if old_tqdm is not None:
            task_module.tqdm = functools.partial(tqdm, disable=True)
        if bars:
            datasets_utils.disable_progress_bars()
        try:
            yield
        finally:
            logger.setLevel(old_level)
            if old_tqdm is not None:
                task_module.tqdm = old_tqdm
            if bars:
                datasets_utils.enable_progress_bars()


@dataclass(eq=False)
class LMEvalTask:
    """Loaded lm-eval task (or group) ``name`` from ``source``; ``loaded`` is ``TaskManager.load()``'s result."""

    source: str
    name: str
    loaded: dict[str, Any] = field(repr=False)
    higher_is_better: dict[str, bool | None] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def metrics(self) -> list[str]:
        """Metric names the task reports (without filter), in the task's order."""
        return list(self.higher_is_better)

    def resolve_metric(self, metric: str | None) -> tuple[str, bool]:
        """``(metric, higher_is_better)`` for a spec's METRIC (None: the task's first metric)."""
        if not self.metrics:
            raise ConfigError(f"lm-eval task {self.name!r} ({self.source}) reports no metrics: add a metric_list")
        chosen = metric or self.metrics[0]
        base = chosen.split("/", 1)[0]
        if base not in self.higher_is_better:
            raise ConfigError(f"lm-eval task {self.name!r} has no metric {base!r} (its metrics: "
                              f"{', '.join(self.metrics)})")
        hib = self.higher_is_better[base]
        if hib is None:
            raise ConfigError(f"lm-eval does not say whether higher {base!r} is better for task {self.name!r}: "
                              "set higher_is_better in its metric_list")
        return chosen, bool(hib)


def _task_config(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=True)
    except Exception as exc:  # YAML syntax, a missing include, a !function that does not import...
        raise ConfigError(f"cannot read lm-eval task file {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(cfg.get("task"), str) and not isinstance(cfg.get("group"), str):
        raise ConfigError(f"lm-eval task file {str(path)!r} names no task: it needs a 'task: NAME' (or "
                          "'group: NAME') entry")
    return cfg


def _relative_data_files(cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    """``dataset_kwargs.data_files`` (str, list or split -> str/list) made absolute against ``base`` when relative."""
    kwargs = cfg.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return cfg

    def fix(p: Any) -> Any:
        if not isinstance(p, str) or "://" in p:
            return p
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else base / q)

    files = kwargs["data_files"]
    if isinstance(files, Mapping):
        files = {k: [fix(x) for x in v] if isinstance(v, list) else fix(v) for k, v in files.items()}
    elif isinstance(files, list):
        files = [fix(x) for x in files]
    else:
        files = fix(files)
    return {**cfg, "dataset_kwargs": {**kwargs, "data_files": files}}


def _higher_is_better(loaded: Mapping[str, Any], name: str) -> dict[str, bool | None]:
    tasks = loaded["tasks"]
    members = [tasks[name]] if name in tasks else list(tasks.values())
    out: dict[str, bool | None] = {}
    for t in members:
        for m, h in t.higher_is_better().items():
            out[m] = h if m not in out or out[m] == h else None
    return out


def _build(source: str, name: str, specs: list[Any], manager: Any) -> LMEvalTask:
    """Load ``specs`` with ``manager`` offline; turn lm-eval's exceptions into OptiMer errors."""
    try:
        with offline(), _quiet():
            loaded = manager.load(specs)
    except OSError as exc:  # FileNotFoundError (a data file), ConnectionError (offline: not in the local cache)
        raise DataError(f"lm-eval task {name!r} ({source}): its data cannot be read offline: "
                        f"{type(exc).__name__}: {exc}. Local tasks: check dataset_kwargs.data_files (relative "
                        "paths are relative to the YAML); tasks shipped with lm-eval need their dataset in the "
                        "local Hugging Face cache (nothing is downloaded during a search)") from exc
    except Exception as exc:  # a bad config: unknown keys, templates, output types...
        raise ConfigError(f"lm-eval cannot load task {name!r} ({source}): {type(exc).__name__}: {exc}") from exc
    for t in loaded["tasks"].values():  # what lm_eval.simple_evaluate does before evaluating
        if t.get_config("num_fewshot") is None:
            t.set_config(key="num_fewshot", value=0)
    top = name if name in loaded["tasks"] or name in loaded.get("groups", {}) else next(iter(loaded["tasks"]))
    return LMEvalTask(source=source, name=top, loaded=loaded, higher_is_better=_higher_is_better(loaded, top))


def _index_data_files(manager: Any) -> None:
    """Make the relative ``data_files`` of every one-task YAML in ``manager``'s index relative to that YAML.

    A group builds its members from the index; an entry with an inline config and no YAML path is
    built from that config. Entries whose YAML does not load are left to lm-eval (and its errors).
    """
    index = getattr(manager, "task_index", None)
    if not isinstance(index, dict):
        return
    for name, entry in list(index.items()):
        path = getattr(entry, "yaml_path", None)
        if path is None or name not in manager.all_subtasks or not dataclasses.is_dataclass(entry):
            continue
        try:
            cfg = _task_config(Path(path))
        except ConfigError:
            continue
        if cfg.get("task") == name and "group" not in cfg and "data_files" in (cfg.get("dataset_kwargs") or {}):
            index[name] = dataclasses.replace(entry, yaml_path=None,
                                              cfg=_relative_data_files(cfg, Path(path).parent.resolve()))


def _from_yaml(source: str, path: Path) -> LMEvalTask:
    from lm_eval.tasks import TaskManager

    cfg = _task_config(path)
    if isinstance(cfg.get("task"), str) and "group" not in cfg:
        cfg = _relative_data_files(cfg, path.parent.resolve())
        return _build(source, cfg["task"], [cfg], TaskManager(include_defaults=False))
    with _quiet():  # a group: its members are looked up among the YAMLs next to it
        manager = TaskManager(include_path=str(path.parent), include_defaults=False)
    _index_data_files(manager)
    group = cfg["group"]  # by name when indexed (lm-eval 0.4.13 fails to build a group from its path)
    return _build(source, group, [group if group in manager.all_groups else str(path)], manager)


def _from_dir(source: str, root: Path, name: str | None) -> LMEvalTask:
    from lm_eval.tasks import TaskManager

    with _quiet():
        manager = TaskManager(include_path=str(root), include_defaults=False)
    top = manager.all_groups or manager.all_subtasks
    if name is None:
        if len(top) != 1:
            listed = ", ".join(manager.all_groups + manager.all_subtasks) or "none"
            raise ConfigError(f"directory {str(root)!r} defines {len(top)} lm-eval groups/tasks ({listed}): "
                              f"name one as lmeval:{root.as_posix()}/NAME")
        name = top[0]
    entry = manager.task_index.get(name)
    if entry is None or name in manager.all_tags:
        known = manager.all_groups + manager.all_subtasks
        close = difflib.get_close_matches(name, known, n=3)
        raise ConfigError(f"no lm-eval task {name!r} among the YAMLs of {str(root)!r} (tasks: "
                          f"{', '.join(known) or 'none'})" + (f"; did you mean {', '.join(close)}?" if close else ""))
    _index_data_files(manager)
    return _build(source, name, [name], manager)


@functools.lru_cache(maxsize=1)
def _default_manager() -> Any:
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager()


def _registered(source: str) -> LMEvalTask:
    manager = _default_manager()
    if source not in manager.all_tasks:
        close = difflib.get_close_matches(source, manager.all_tasks, n=3)
        raise ConfigError(f"unknown lm-eval task {source!r}: not a task YAML, a directory of them, or a task "
                          "shipped with lm-eval" + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + "; local tasks: lmeval:path/to/task.yaml")
    return _build(source, source, [source], manager)


def load_task(source: str) -> LMEvalTask:
    """The lm-eval task behind a SOURCE (see the module docstring); cached per process.

    Raises ConfigError (unknown task, bad YAML), DataError (data not readable offline) or
    MissingDependencyError (lm-eval not installed).
    """
    source = source.strip()
    if not source:
        raise ConfigError("empty lm-eval task: use lmeval:path/to/task.yaml[:metric] or lmeval:TASK[:metric]")
    require_lm_eval()
    try:
        path = Path(source).expanduser()
        pathlike = path.exists() or "/" in source or os.sep in source
        stamped = path if path.exists() else path.parent if pathlike and path.parent.is_dir() else None
        key = (str(path.resolve()) if pathlike else source, stamped.stat().st_mtime_ns if stamped else 0)
    except (OSError, RuntimeError, ValueError) as exc:  # a name too long, ~unknown_user, a NUL byte...
        raise ConfigError(f"lm-eval task {source[:200]!r} is not a usable path or name: {exc}") from exc
    with _cache_lock:
        cached = _task_cache.get(key)
    if cached is not None:
        return cached
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"lm-eval task file {source!r} does not exist")
        task = _from_yaml(source, path)
    elif path.is_dir():
        task = _from_dir(source, path, None)
    elif path.parent != Path(".") and path.parent.is_dir():
        task = _from_dir(source, path.parent, path.name)
    elif "/" in source or os.sep in source:
        raise ConfigError(f"lm-eval task {source!r}: no such YAML file or directory")
    else:
        task = _registered(source)
    with _cache_lock:
        _task_cache[key] = task
    return task


def split_spec(text: str) -> tuple[str, str | None]:
    """``SOURCE[:METRIC]`` -> ``(SOURCE, METRIC or None)``; METRIC is ``name`` or ``name/filter``."""
    head, sep, tail = text.strip().rpartition(":")
    if sep and head.strip() and _METRIC.match(tail.strip()):
        return head.strip(), tail.strip()
    return text.strip(), None


@dataclass(frozen=True)
class LMEvalTerm:
    """One objective term: ``metric`` of ``task`` (named ``source`` in the spec); ``key``: its recorded name."""

    key: str
    source: str
    task: LMEvalTask
    metric: str
    higher_is_better: bool


def parse_term(text: str) -> LMEvalTerm:
    """The term of an objective item ``lmeval:TEXT`` (TEXT = ``SOURCE[:METRIC]``); loads the task."""
    source, metric = split_spec(text)
    task = load_task(source)
    metric, hib = task.resolve_metric(metric)
    return LMEvalTerm(key=metric_key(source, metric), source=source, task=task, metric=metric, higher_is_better=hib)


def metric_key(source: str, metric: str) -> str:
    """How a task metric is named among a trial's metrics: ``lmeval:SOURCE:METRIC``."""
    return f"{PREFIX}:{source}:{metric}"


def pick_metric(metrics: Mapping[str, float], metric: str, task_name: str = "") -> float:
    """``metrics[metric]``, or its only filtered variant ``metric/FILTER`` when the task has no none filter."""
    if metric in metrics:
        return metrics[metric]
    variants = [k for k in metrics if k.startswith(metric + "/")]
    if len(variants) == 1:
        return metrics[variants[0]]
    raise ConfigError(f"lm-eval task {task_name!r} reported no {metric!r}"
                      + (f" (filters: {', '.join(variants)}; name one as METRIC/FILTER)" if variants
                         else f" (reported: {', '.join(metrics) or 'nothing'})"))


@functools.cache
def _hflm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """HFLM without its per-call progress bars."""

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


class LMEvalScorer:
    """Scores lm-eval tasks on a model, keeping one HFLM wrapper for the last (model, tokenizer, batch size).

    The wrapper holds the model by reference: building it again is only needed for another model
    object. A tokenizer without a pad token is copied first (HFLM would set one on it).
    """

    def __init__(self) -> None:
        self._lm: Any = None
        self._key: tuple[Any, Any, int] | None = None
        self._lock = threading.Lock()

    def lm(self, model: Any, tokenizer: Any, batch_size: int = 16) -> Any:
        """The HFLM wrapping ``model`` (built on first use, then reused)."""
        require_lm_eval()
        with self._lock:
            if self._key is not None and self._key[0] is model and self._key[1] is tokenizer \
                    and self._key[2] == batch_size:
                return self._lm
            tok = tokenizer if getattr(tokenizer, "pad_token_id", None) is not None else copy.deepcopy(tokenizer)
            with _quiet(logging.ERROR):  # "pretrained is not a str": that is the point here
                self._lm = _hflm_class()(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size)
            self._key = (model, tokenizer, batch_size)
            return self._lm

    def evaluate(self, task: LMEvalTask, model: Any, tokenizer: Any, *, limit: int | None = None,
                 batch_size: int = 16) -> dict[str, float]:
        """``{metric: value}`` of ``task`` on the first ``limit`` documents (``metric/filter`` off the none filter)."""
        from lm_eval.evaluator import evaluate

        lm = self.lm(model, tokenizer, batch_size)
        with task.lock, offline(), _quiet():
            for t in task.loaded["tasks"].values():
                t.set_fewshot_seed(seed=FEWSHOT_SEED)
            out = evaluate(lm=lm, task_dict=task.loaded, limit=limit, bootstrap_iters=0, log_samples=False)
        results = (out or {}).get("results", {}).get(task.name)
        if not results:
            raise ConfigError(f"lm-eval reported no results for {task.name!r} ({task.source}); a group needs an "
                              "aggregate_metric_list, or name one of its tasks")
        metrics: dict[str, float] = {}
        for k, v in results.items():
            metric, sep, filt = k.partition(",")
            if not sep or "_stderr" in metric or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            metrics[metric if filt == "none" else f"{metric}/{filt}"] = float(v)
        return metrics
