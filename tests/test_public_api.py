"""The public API: every name ``optimer_lib`` exports imports, ``import optimer_lib`` stays cheap, and every
library or workbench name the README and docs/ mention (``from optimer_lib... import X``, ``workbench.x.y``,
``SomeClass.method``) resolves."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import optimer_lib

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ERRORS = {"OptimerError", "ConfigError", "DataError", "ModelError", "VectorError", "MissingDependencyError"}


def test_every_exported_name_imports():
    assert len(optimer_lib.__all__) == len(set(optimer_lib.__all__))
    assert set(optimer_lib.__all__) == ERRORS | {"__version__"} | set(optimer_lib._LAZY)
    for name in optimer_lib.__all__:
        value = getattr(optimer_lib, name)
        assert value is not None, name
        if name in optimer_lib._LAZY:  # the very object of its defining module
            assert value is getattr(importlib.import_module(optimer_lib._LAZY[name]), name), name
    ns: dict = {}
    exec("from optimer_lib import *", ns)
    assert set(optimer_lib.__all__) <= set(ns)
    assert set(optimer_lib.__all__) <= set(dir(optimer_lib))


def test_unknown_names_fail_clearly():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        optimer_lib.not_a_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from optimer_lib import not_a_name", {})


def test_the_front_door_names_are_there():
    """The names the README's library tour and the docs use (design.md's stages, front to back)."""
    for name in ("open_pool", "extract_vector", "save_vector", "load_vector", "export_merged", "train_cpt",
                 "TrainConfig", "evaluate_suite", "load_eval_suite", "parse_objective", "SearchConfig", "run_search",
                 "rerank", "run_pareto_search", "ResidentMerger", "Merger", *ERRORS):
        assert name in optimer_lib.__all__, name


def test_import_is_cheap():
    """``import optimer_lib`` (every ``optimer`` command starts with it) loads neither torch nor optuna."""
    code = "import sys, optimer_lib; print(sorted(m for m in ('torch', 'optuna', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


_PACKAGES = r"(?:optimer_lib|workbench)"
_FROM = re.compile(rf"from\s+({_PACKAGES}(?:\.\w+)*)\s+import\s+(?:\(([^)]*)\)|([\w \t,]+))")
_DOTTED = re.compile(rf"(?<![\w/.\-]){_PACKAGES}(?:\.\w+)+")
# ``workbench.md`` is a page, not a module: a dotted name whose second part is a file extension is a file name.
_FILE_SUFFIXES = {"md", "py", "png", "svg", "json", "yaml", "ipynb", "db"}
# `SomeClass.method` in backticks (a call's parentheses allowed): checked when a class of that name is ours.
_CLASS_ATTR = re.compile(r"`([A-Z]\w*)\.(\w+)(?:\([^`]*\))?`")


def _resolve(dotted: str) -> object:
    """``optimer_lib.a.b.c``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def doc_references(text: str) -> set[str]:
    refs = set()
    for m in _FROM.finditer(text):
        names = (m.group(2) or m.group(3)).split(",")
        refs |= {f"{m.group(1)}.{n.split(' as ')[0].strip()}" for n in names if n.strip()}
    refs |= {m.group(0).rstrip(".") for m in _DOTTED.finditer(_FROM.sub("", text))}
    return {r for r in refs if r.split(".")[1] not in _FILE_SUFFIXES}


def our_classes() -> dict[str, list[type]]:
    """Every class defined in ``optimer_lib`` and ``workbench``, by name (a name may be defined twice)."""
    import pkgutil

    import workbench

    out: dict[str, list[type]] = {}
    for pkg in (optimer_lib, workbench):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if isinstance(obj, type) and obj.__module__ == info.name:
                    out.setdefault(name, []).append(obj)
    return out


def test_reference_extraction_sees_both_forms():
    text = ("```python\nfrom optimer_lib import open_pool, SearchConfig  # tour\n"
            "from optimer_lib.search.pareto import (\n    pareto_front,\n    export_point,\n)\n```\n"
            "see `optimer_lib.search.rerank.rerank` and optimer_lib.fileio, not optimer_lib/cli.py\n")
    assert doc_references(text) == {"optimer_lib.open_pool", "optimer_lib.SearchConfig",
                                    "optimer_lib.search.pareto.pareto_front", "optimer_lib.search.pareto.export_point",
                                    "optimer_lib.search.rerank.rerank", "optimer_lib.fileio"}
    text = "see [workbench.md](workbench.md), `workbench.tuning.scoring_order` and from workbench.widgets import X\n"
    assert doc_references(text) == {"workbench.tuning.scoring_order", "workbench.widgets.X"}


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_library_name_in_the_docs_resolves(doc):
    missing = []
    for ref in sorted(doc_references(doc.read_text(encoding="utf-8"))):
        try:
            _resolve(ref)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{ref}: {exc}")
    assert missing == [], f"{doc.name} names what the library does not have"


@pytest.fixture(scope="module")
def classes() -> dict[str, list[type]]:
    return our_classes()


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_every_method_the_docs_name_exists(doc, classes):
    """`Session.score_stream`, `TuneTab._release_fn(move)`: the class is ours, so the attribute must be there."""
    missing = [f"{cls}.{attr}" for cls, attr in sorted(set(_CLASS_ATTR.findall(doc.read_text(encoding="utf-8"))))
               if cls in classes and not any(hasattr(c, attr) for c in classes[cls])]
    assert missing == [], f"{doc.name} names methods our classes do not have"
