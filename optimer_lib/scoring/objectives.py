"""What a merge-weight search minimises: presets, weighted metric lists, or a user callable.

    from optimer_lib.scoring.objectives import parse_objective
    obj = parse_objective("balanced", ["en", "ja", "math"], qa_names=["math"])
    obj = parse_objective("ppl:ja=1,loss:en=0.5,acc:math=2", ["en", "ja"], qa_names=["math"])
    obj = parse_objective("my_pkg.scoring:score", ["en"])      # or "path/to/file.py:score"
    obj = parse_objective("lmeval:examples/lmeval/arith_mc.yaml:acc_norm=2,loss:ja", ["ja"])  # [lmeval] extra
    value, metrics = obj.evaluate(model, tokenizer, suite, limit=100)   # value: lower is better

Metrics are named ``kind:name``: ``loss`` and ``ppl`` (lower is better) for text distributions and
``acc`` (higher is better) for QA tasks. A weighted list is normalised, ``Σ w·v / Σ|w|`` with acc
entering as ``-v``, so weights are relative and values stay on the metrics' own scale.

A callable is called as ``fn(model, tokenizer, **kw)``, where ``kw`` holds whichever of ``suite``,
``limit``, ``seq_len`` and ``batch_size`` it accepts, and returns either the objective's float or a
dict of metrics with an ``"objective"`` entry (the rest is recorded). It is minimised unless it says
otherwise: a function attribute ``higher_is_better = True`` (or ``--maximize`` / ``maximize=True``)
makes every search, Pareto front and re-ranking maximise it (an accuracy, a reward).

A term ``lmeval:SOURCE[:METRIC]`` is a metric of an lm-evaluation-harness task (a local task YAML,
a directory of them, or a task shipped with lm-eval; see :mod:`optimer_lib.scoring.lmeval`), scored on the
model itself with ``limit`` documents; higher-is-better metrics (acc, acc_norm...) enter as ``-v``.
A list with such terms becomes a callable objective (:class:`WeightedTerms`) that scores its lm-eval
tasks and only the dev sets it reads, and records all of their metrics.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimer_lib.errors import ConfigError, DataError
from optimer_lib.scoring.evaluate import EvalSuite, evaluate_suite

if TYPE_CHECKING:
    from optimer_lib.scoring.lmeval import LMEvalTerm

LOWER_IS_BETTER = ("loss", "ppl")
HIGHER_IS_BETTER = ("acc",)
KINDS = LOWER_IS_BETTER + HIGHER_IS_BETTER
LMEVAL = "lmeval"  # lmeval:SOURCE[:METRIC], an lm-evaluation-harness task metric (optional extra)

# Weight of every other distribution in a single-target preset. Optimising one target alone lets
# the search push that vector's α up until the rest of the model is forgotten; a small guard term
# keeps such solutions from winning on a hair of target gain while the target still dominates.
RETENTION_WEIGHT = 0.1

_EXAMPLE = ("example: --objective 'loss:ja=1,loss:en=0.5,acc:math=2' (weights optional, default 1; "
            "lm-eval tasks as lmeval:TASK.yaml[:METRIC])")
_CALL_KWARGS = ("suite", "limit", "seq_len", "batch_size")


def _names_of_kinds(terms: Mapping[str, float], kinds: Iterable[str]) -> set[str]:
    """The NAMEs of the ``KIND:NAME`` metric keys whose KIND is one of ``kinds``."""
    return {k.split(":", 1)[1] for k in terms if k.split(":", 1)[0] in kinds}


@dataclass
class Objective:
    """A scalar to minimise, from weighted metrics (``terms``) or from a user callable (``fn``).

    ``obj(metrics)`` maps already computed metrics to the value; ``obj.evaluate(model, ...)``
    computes only the metrics it needs and returns ``(value, metrics)``.
    """

    terms: dict[str, float] = field(default_factory=dict)
    fn: Callable[..., Any] | None = None
    spec: str = ""
    maximize: bool | None = None  # None: a callable's own ``higher_is_better`` attribute (default False)

    def __post_init__(self) -> None:
        if (self.fn is None) == (not self.terms):
            raise ConfigError("an Objective needs either metric terms or a callable (exactly one of them)")
        if self.maximize is None:
            self.maximize = bool(getattr(self.fn, "higher_is_better", False))
        if self.maximize and (self.fn is None or isinstance(self.fn, WeightedTerms)):
            raise ConfigError("a weighted metric list is always minimised (acc terms enter negated): drop "
                              "--maximize, or give a callable objective that returns the value to maximise")
        if self.terms and not sum(abs(w) for w in self.terms.values()) > 0:
            raise ConfigError("objective weights are all zero: give at least one metric a non-zero weight")
        if not self.spec:
            self.spec = (",".join(f"{k}={w:g}" for k, w in self.terms.items()) if self.terms
                         else f"{getattr(self.fn, '__module__', '?')}:{getattr(self.fn, '__qualname__', '?')}")

    @property
    def direction(self) -> str:
        """``"maximize"`` for a callable that says higher is better (``--maximize``, ``higher_is_better``)."""
        return "maximize" if self.maximize else "minimize"

    @property
    def needed_metrics(self) -> tuple[str, ...]:
        """The metric names this objective reads (empty for a callable, which scores for itself)."""
        return tuple(self.terms)

    @property
    def needed_texts(self) -> set[str]:
        """Text distributions whose loss must be computed."""
        return _names_of_kinds(self.terms, LOWER_IS_BETTER)

    @property
    def needed_qa(self) -> set[str]:
        """QA tasks whose accuracy must be computed."""
        return _names_of_kinds(self.terms, HIGHER_IS_BETTER)

    def __call__(self, metrics: Mapping[str, float]) -> float:
        """The value to minimise given computed ``metrics``."""
        if isinstance(self.fn, WeightedTerms):  # its terms say how, whatever spec stored "objective"
            return self.fn.value(metrics)
        if self.fn is not None:
            if "objective" not in metrics:
                raise ConfigError(f"objective {self.spec}: metrics lack the 'objective' entry")
            return float(metrics["objective"])
        missing = [k for k in self.terms if k not in metrics]
        if missing:
            raise ConfigError(f"objective {self.spec}: metrics {missing} were not computed "
                              f"(have {sorted(metrics)})")
        total = sum(w * (-metrics[k] if k.split(":", 1)[0] in HIGHER_IS_BETTER else metrics[k])
                    for k, w in self.terms.items())
        return total / sum(abs(w) for w in self.terms.values())

    def evaluate(self, model: Any, tokenizer: Any, suite: EvalSuite, *, limit: int | None = None,
                 seq_len: int = 128, batch_size: int = 16) -> tuple[float, dict[str, float]]:
        """Score ``model``: returns ``(value to minimise, metrics)``."""
        if self.fn is None:
            sub = suite.select(texts=self.needed_texts, qa=self.needed_qa)
            metrics = evaluate_suite(model, tokenizer, sub, limit=limit, seq_len=seq_len, batch_size=batch_size)
            return self(metrics), metrics
        offered = {"suite": suite, "limit": limit, "seq_len": seq_len, "batch_size": batch_size}
        out = self.fn(model, tokenizer, **_accepted(self.fn, offered))
        if isinstance(out, Mapping):
            if "objective" not in out:
                raise ConfigError(f"objective callable {self.spec} returned a dict without an 'objective' "
                                  f"entry (keys: {sorted(out)}); add 'objective': <float to minimise>")
            metrics = {str(k): float(v) for k, v in out.items()}
            return metrics["objective"], metrics
        try:
            value = float(out)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"objective callable {self.spec} returned {type(out).__name__}; "
                              "return a float (lower is better) or a dict with an 'objective' entry") from exc
        return value, {"objective": value}


class WeightedTerms:
    """A weighted metric list with lm-eval terms, as an objective callable ``fn(model, tokenizer, **kw)``.

    ``terms`` maps every metric (``loss:ja``, ``lmeval:SOURCE:METRIC``...) to its weight,
    ``lmeval_terms`` the lm-eval ones to their task. A call scores each lm-eval task once on
    ``model`` with ``limit`` documents (one HFLM wrapper, built on the first call and reused while the
    model object is the same), plus the suite's dev sets that the other terms read, and returns
    every metric computed and ``"objective"``: ``Σ w·v / Σ|w|``, higher-is-better metrics as ``-v``.
    """

    def __init__(self, terms: Mapping[str, float], lmeval_terms: Mapping[str, LMEvalTerm]) -> None:
        from optimer_lib.scoring.lmeval import LMEvalScorer

        missing = [k for k in lmeval_terms if k not in terms]
        if missing:
            raise ConfigError(f"lm-eval terms {missing} have no weight in {sorted(terms)}")
        self.terms = dict(terms)
        self.lmeval_terms = dict(lmeval_terms)
        self.scorer = LMEvalScorer()

    @property
    def needed_texts(self) -> set[str]:
        return _names_of_kinds(self.terms, LOWER_IS_BETTER)

    @property
    def needed_qa(self) -> set[str]:
        return _names_of_kinds(self.terms, HIGHER_IS_BETTER)

    def _higher_is_better(self, key: str) -> bool:
        if key in self.lmeval_terms:
            return self.lmeval_terms[key].higher_is_better
        return key.split(":", 1)[0] in HIGHER_IS_BETTER

    def value(self, metrics: Mapping[str, float]) -> float:
        """The value to minimise from computed ``metrics`` (which must hold every term)."""
        missing = [k for k in self.terms if k not in metrics]
        if missing:
            raise ConfigError(f"metrics {missing} were not computed (have {sorted(metrics)})")
        total = sum(w * (-metrics[k] if self._higher_is_better(k) else metrics[k]) for k, w in self.terms.items())
        return total / sum(abs(w) for w in self.terms.values())

    def __call__(self, model: Any, tokenizer: Any, *, suite: EvalSuite | None = None, limit: int | None = None,
                 seq_len: int = 128, batch_size: int = 16) -> dict[str, float]:
        from optimer_lib.scoring.lmeval import metric_key, pick_metric

        metrics: dict[str, float] = {}
        texts, qa = self.needed_texts, self.needed_qa
        if texts or qa:
            if suite is None:
                raise ConfigError(f"objective terms {sorted(texts | qa)} need a dev suite")
            metrics.update(evaluate_suite(model, tokenizer, suite.select(texts=texts, qa=qa), limit=limit,
                                          seq_len=seq_len, batch_size=batch_size))
        scored: dict[int, dict[str, float]] = {}
        for key, term in self.lmeval_terms.items():
            if id(term.task) not in scored:
                scored[id(term.task)] = self.scorer.evaluate(term.task, model, tokenizer, limit=limit,
                                                             batch_size=batch_size)
            task_metrics = scored[id(term.task)]
            metrics.update({metric_key(term.source, m): v for m, v in task_metrics.items()})
            metrics[key] = pick_metric(task_metrics, term.metric, term.task.name)
        metrics["objective"] = self.value(metrics)
        return metrics


def _accepted(fn: Callable[..., Any], offered: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``offered`` that ``fn`` declares (all of them if it takes ``**kw``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return offered
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in offered.items() if k in names}


def presets(available: Sequence[str], qa_names: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Named objectives for a suite: ``balanced`` and one per distribution / QA task name.

    ``balanced`` weighs the loss of every text distribution and the accuracy of every QA task
    equally. ``<name>`` is ``loss:<name>`` (or ``acc:<name>`` for a QA-only task) with weight 1 plus
    the loss of every other distribution at :data:`RETENTION_WEIGHT`. ``balanced`` wins over a
    distribution of that name (use ``loss:balanced`` for it).
    """
    table: dict[str, dict[str, float]] = {}
    if available or qa_names:
        table["balanced"] = {**{f"loss:{n}": 1.0 for n in available}, **{f"acc:{n}": 1.0 for n in qa_names}}
    for name in [*available, *[q for q in qa_names if q not in available]]:
        target = f"loss:{name}" if name in available else f"acc:{name}"
        table.setdefault(name, {target: 1.0, **{f"loss:{o}": RETENTION_WEIGHT for o in available if o != name}})
    return table


def valid_metrics(available: Sequence[str], qa_names: Sequence[str] = ()) -> list[str]:
    """Every metric a weighted list may name."""
    return [f"{k}:{n}" for n in available for k in LOWER_IS_BETTER] + [f"acc:{n}" for n in qa_names]


def parse_objective(spec: str, available: Sequence[str], *, qa_names: Sequence[str] = (),
                    maximize: bool | None = None) -> Objective:
    """Turn an ``--objective`` string into an :class:`Objective`; every problem raises ConfigError.

    ``available`` are the text distribution names of the dev suite, ``qa_names`` its QA tasks.
    Forms: a preset name (see :func:`presets`), a list ``kind:name[=weight],...``, or a callable
    ``module:function`` / ``path/to/file.py:function``. A ``kind:`` prefix that is a metric kind
    (loss, ppl, acc) or ``lmeval`` always means a metric, never a module of that name. A list with
    ``lmeval:SOURCE[:METRIC]`` terms loads their lm-eval tasks now (so a bad task fails before any
    trial; MissingDependencyError without the ``lmeval`` extra) and becomes a :class:`WeightedTerms`.
    ``maximize=True`` asks to maximise a callable (None: the callable's ``higher_is_better`` attribute);
    weighted lists are always minimised.
    """
    spec = (spec or "").strip()
    table = presets(available, qa_names)
    metrics = (f"loss:NAME or ppl:NAME for NAME in {', '.join(available)}" if available else "")
    metrics += (", " if metrics and qa_names else "") + (f"acc:{'/'.join(qa_names)}" if qa_names else "")
    help_text = (f"presets: {', '.join(table) or '(none: the suite is empty)'}; metrics: {metrics or '(none)'}; "
                 f"{_EXAMPLE}; or a callable 'module:function' / 'path/to/file.py:function'")
    if not spec:
        raise ConfigError(f"empty --objective; {help_text}")
    if maximize and not is_callable_spec(spec, table):
        raise ConfigError(f"--maximize applies to a callable objective; {spec!r} is a weighted metric list, which "
                          "is always minimised (acc terms enter negated): drop --maximize")
    if spec in table:
        return Objective(terms=dict(table[spec]), spec=spec)
    head = spec.split(":", 1)[0].strip()
    if "=" in spec or "," in spec or head in KINDS or head == LMEVAL:
        terms, lmeval_terms = _parse_terms(spec, available, qa_names, help_text)
        if lmeval_terms:
            return Objective(fn=WeightedTerms(terms, lmeval_terms), spec=spec)
        return Objective(terms=terms, spec=spec)
    if ":" in spec:
        return Objective(fn=_load_callable(spec, help_text), spec=spec, maximize=maximize)
    raise ConfigError(f"unknown objective preset {spec!r}; {help_text}")


def is_callable_spec(spec: str, table: Mapping[str, Any] = ()) -> bool:
    """Whether ``spec`` names a callable (``module:function``) rather than a preset or a metric list."""
    head = spec.split(":", 1)[0].strip()
    return spec not in table and ":" in spec and not ("=" in spec or "," in spec or head in KINDS or head == LMEVAL)


def _parse_terms(spec: str, available: Sequence[str], qa_names: Sequence[str],
                 help_text: str) -> tuple[dict[str, float], dict[str, LMEvalTerm]]:
    terms: dict[str, float] = {}
    lmeval_terms: dict[str, LMEvalTerm] = {}
    problems: list[str] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            problems.append("empty item (stray comma)")
            continue
        metric, _, weight_text = item.partition("=")
        metric = metric.strip()
        kind, sep, name = metric.partition(":")
        kind, name = kind.strip(), name.strip()
        key = f"{kind}:{name}"
        if kind == LMEVAL and sep:
            from optimer_lib.scoring.lmeval import parse_term

            try:
                term = parse_term(name)  # MissingDependencyError propagates: no point listing more problems
            except (ConfigError, DataError) as exc:
                problems.append(f"{item!r}: {exc}")
            else:
                key = term.key
                lmeval_terms[key] = term
        elif not sep:
            problems.append(f"{item!r}: expected kind:name, e.g. loss:{next(iter(available), 'en')}")
        elif kind not in KINDS:
            problems.append(f"{item!r}: unknown metric kind {kind!r} (kinds: {', '.join(KINDS)}, {LMEVAL})")
        elif kind in LOWER_IS_BETTER and name not in available:
            problems.append(f"{item!r}: unknown distribution {name!r} (distributions: "
                            f"{', '.join(available) or 'none'})")
        elif kind == "acc" and name not in qa_names:
            problems.append(f"{item!r}: no QA task {name!r} (QA tasks: {', '.join(qa_names) or 'none'})")
        weight = 1.0
        if weight_text.strip() or "=" in item:
            try:
                weight = float(weight_text)
            except ValueError:
                problems.append(f"{item!r}: weight {weight_text.strip()!r} is not a number")
            else:
                if not math.isfinite(weight):
                    problems.append(f"{item!r}: weight must be finite")
        if key in terms:
            problems.append(f"{item!r}: {key} given twice (give it once with the summed weight)")
        terms[key] = weight
    if not problems and not sum(abs(w) for w in terms.values()) > 0:
        problems.append("all weights are zero")
    problems = list(dict.fromkeys(problems))  # "a,,b,," has one stray-comma problem, said once
    if problems:
        if len(problems) == 1:  # one problem, one line
            raise ConfigError(f"bad --objective {spec!r}: {problems[0]}; {help_text}")
        listed = "\n  - ".join(problems)
        raise ConfigError(f"bad --objective {spec!r}:\n  - {listed}\n{help_text}")
    return terms, lmeval_terms


def _load_callable(spec: str, help_text: str) -> Callable[..., Any]:
    target, _, attr = spec.rpartition(":")
    target, attr = target.strip(), attr.strip()
    hint = f"(metric kinds are {', '.join(KINDS)}; {help_text})"
    if not target or not attr:
        raise ConfigError(f"bad --objective {spec!r}: expected 'module:function' or 'file.py:function' {hint}")
    try:
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target).expanduser()
            if not path.is_file():
                raise ConfigError(f"objective file {str(path)!r} does not exist {hint}")
            mod_name = f"optimer_user_objective_{abs(hash(str(path.resolve())))}"
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ConfigError(f"cannot import {str(path)!r} as Python {hint}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module  # dataclasses/pickle look modules up here
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:  # any error while importing user code is the user's to fix
        raise ConfigError(f"cannot import objective module {target!r}: {type(exc).__name__}: {exc} "
                          f"(is it on PYTHONPATH / is the file path right?) {hint}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ConfigError(f"{target!r} has no attribute {attr!r}; its callables: "
                              f"{', '.join(public) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{target}:{attr} is a {type(obj).__name__}, not callable: point --objective at a "
                          "function fn(model, tokenizer, **kw) returning a float or a dict with 'objective'")
    return obj
