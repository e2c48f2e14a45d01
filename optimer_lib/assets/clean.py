"""Text cleaning for the embedded corpora: strip markup, normalise, deduplicate, chunk.

    from optimer_lib.assets.clean import strip_roff, chunk_text
    docs = chunk_text(strip_roff(open("ls.1").read()), max_chars=600)

Pure functions, unit-tested in ``tests/test_assets_clean.py``.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Iterable

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>]")
_HTML_TAG = re.compile(r"<[^>]+>")
_HTML_DROP = re.compile(r"<(script|style)\b.*?</\1>", re.S | re.I)
# roff escapes: fonts (\fB, \f[I]), sizes (\s-1), named chars (\(em, \[em]), strings (\*(Tm), misc.
_ROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\s[+-]?\d+"), ""),
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),
    (re.compile(r"\\\((em|en)"), "—"),
    (re.compile(r"\\\(bu"), "•"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[&/,:%|^)~0]"), ""),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\(.)"), r"\1"),
]
_ROFF_KEEP_ARGS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "IP", "TP", "Nm",
                   "Nd", "Fl", "Ar", "Op", "Pa", "Xr", "Dt", "It", "Sh", "Ss", "Em", "Sy", "Li", "Dq", "Qq"}


def strip_ansi(text: str) -> str:
    """Remove ANSI colour/control sequences (as in Debian's fortunes-zh)."""
    return _ANSI.sub("", text)


def strip_html(text: str) -> str:
    """Remove tags (dropping script/style bodies) and unescape entities."""
    return html.unescape(_HTML_TAG.sub(" ", _HTML_DROP.sub(" ", text)))


def strip_roff(text: str) -> str:
    """Turn a man page's roff source into plain text.

    Request lines (``.TH``, ``.PP``...) are dropped except those whose arguments are
    visible text (``.SH NAME``, ``.B word``); comments and escapes are removed.
    """
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if not parts:
                continue
            if parts[0] in _ROFF_KEEP_ARGS and len(parts) > 1:
                line = parts[1].replace('"', "")
            else:
                continue
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line)
    return "\n".join(out)


def normalise(text: str) -> str:
    """Unify newlines, drop control characters, trim trailing spaces, collapse 3+ blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = "".join(ch for ch in text if ch == "\n" or ch >= " ")
    lines = [ln.rstrip() for ln in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def dedupe(docs: Iterable[str]) -> list[str]:
    """Drop exact duplicates (after whitespace normalisation), keeping first occurrences in order."""
    seen: set[bytes] = set()
    out = []
    for d in docs:
        key = hashlib.blake2b(" ".join(d.split()).encode(), digest_size=12).digest()
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def chunk_text(text: str, max_chars: int = 600, min_chars: int = 40) -> list[str]:
    """Split text into documents of at most ``max_chars`` on paragraph, then line boundaries.

    Pieces shorter than ``min_chars`` are dropped (headers, stray lines).
    """
    chunks: list[str] = []
    cur = ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        pieces = [para] if len(para) <= max_chars else _split_long(para, max_chars)
        for piece in pieces:
            if cur and len(cur) + 2 + len(piece) > max_chars:
                chunks.append(cur)
                cur = ""
            cur = f"{cur}\n\n{piece}" if cur else piece
    if cur:
        chunks.append(cur)
    return [c.strip() for c in chunks if len(c.strip()) >= min_chars]


def _split_long(para: str, max_chars: int) -> list[str]:
    out, cur = [], ""
    for line in para.split("\n"):
        while len(line) > max_chars:  # one very long line (e.g. Chinese prose without newlines)
            out.append(line[:max_chars])
            line = line[max_chars:]
        if cur and len(cur) + 1 + len(line) > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n{line}" if cur else line
    if cur:
        out.append(cur)
    return out


def cjk_fraction(text: str) -> float:
    """Share of characters in the CJK/kana ranges (used to keep only mostly-Japanese/Chinese docs)."""
    if not text:
        return 0.0
    n = sum(1 for ch in text if "\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff")
    return n / len(text)
