"""Corpora: the embedded tiny world (package data, see :func:`assets_dir`) or the user's own text/jsonl files.

    from optimer_lib.data import load_corpus, load_eval_suite, pack_tokens
    docs = load_corpus("ja", "train")                  # embedded corpus by name
    docs = load_corpus("my_notes.jsonl")               # user file: one {"text": ...} per line
    suite = load_eval_suite(["ja", "math"], "dev")     # texts for perplexity, math Q/A pairs
    blocks = pack_tokens(docs, tokenizer, seq_len=128) # LongTensor [n_blocks, seq_len]

Embedded corpora are ``<assets_dir()>/corpora/<name>/<split>.jsonl.xz`` with splits ``base`` (base
pretraining share), ``train`` (CPT), ``dev`` (search) and ``test`` (final numbers), disjoint.
User files: ``.txt`` (documents separated by blank lines), ``.jsonl``/``.jsonl.xz``/``.jsonl.gz``
(a ``text`` field per line). A user path is used whole for every split.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from optimer_lib.errors import ConfigError, DataError

SPLITS = ("base", "train", "dev", "test")
QA_TASKS = ("math",)  # embedded corpora whose documents are "Question: ...\nAnswer: N"


def assets_dir() -> Path:
    """The embedded world: ``$OPTIMER_ASSETS`` if set, else the installed package data (``optimer_assets``).

    Never a path relative to this source file: a wheel has no checkout around it.
    """
    env = os.environ.get("OPTIMER_ASSETS")
    if env:
        return Path(env)
    try:
        import optimer_assets
    except ImportError as exc:
        raise DataError("the embedded world (package optimer_assets) is not installed: install the project "
                        "(`pip install .`, or `pip install -e .` in a checkout), or set OPTIMER_ASSETS to a folder "
                        "built by `python -m optimer_lib.assets build --out DIR`") from exc
    return optimer_assets.path()


def embedded_corpora() -> list[str]:
    """Names of the corpora shipped in the embedded world (``<assets_dir()>/corpora``)."""
    root = assets_dir() / "corpora"
    return sorted(p.name for p in root.iterdir() if (p / "dev.jsonl.xz").exists()) if root.is_dir() else []


def _open_text(path: Path):
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: Path) -> list[str]:
    """Documents from a jsonl file (optionally .xz/.gz) with a ``text`` field per line."""
    docs = []
    with _open_text(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{i}: expected a JSON object with a 'text' field ({exc})") from exc
    return docs


def write_jsonl_xz(docs: Sequence[str], path: Path) -> None:
    """Write documents as compressed jsonl, atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with lzma.open(tmp, "wt", encoding="utf-8", preset=9) as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def load_corpus(name_or_path: str | os.PathLike, split: str = "train", *, limit: int | None = None) -> list[str]:
    """Documents of an embedded corpus split, or of a user text/jsonl file."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    s = str(name_or_path)
    embedded = embedded_corpora()
    if s in embedded:
        docs = read_jsonl(assets_dir() / "corpora" / s / f"{split}.jsonl.xz")
    else:
        path = Path(s)
        if not path.is_file():
            hint = (f"embedded corpora: {', '.join(embedded)}" if embedded else "no embedded corpora: build them "
                    "with python -m optimer_lib.assets build --out DIR and set OPTIMER_ASSETS=DIR")
            raise DataError(f"unknown corpus {s!r}: not an embedded corpus and no such file ({hint})")
        if ".jsonl" in path.name:
            docs = read_jsonl(path)
        else:
            with _open_text(path) as fh:
                docs = [d.strip() for d in fh.read().split("\n\n") if d.strip()]
    if not docs:
        raise DataError(f"corpus {s!r} ({split}) is empty: give it at least a few documents")
    return docs[:limit] if limit else docs


_FORBIDDEN = re.compile(r"[:,=\s]")


@dataclass
class EvalSuite:
    """Named dev sets: ``texts`` (name -> documents, scored by loss) and ``qa`` (name -> (prompt, gold)).

    Names become metric names (``loss:<name>``, ``ppl:<name>``, ``acc:<name>``), so they may not
    contain ``:``, ``,``, ``=`` or whitespace. A name may appear in both (e.g. math text and math QA).
    """

    texts: dict[str, list[str]] = field(default_factory=dict)
    qa: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [n for n in (*self.texts, *self.qa) if not n or _FORBIDDEN.search(n)]
        if bad:
            raise ConfigError(f"dev-set names {bad} are not usable as metric names: drop ':', ',', '=' "
                              "and spaces (e.g. 'ja', 'code_py')")

    def names(self) -> list[str]:
        """All names, text distributions first, each once."""
        return list(dict.fromkeys([*self.texts, *self.qa]))

    def select(self, texts: Collection[str] | None = None, qa: Collection[str] | None = None) -> EvalSuite:
        """A suite with only the given text and QA names (``None`` keeps all of that kind)."""
        return EvalSuite(
            texts={k: v for k, v in self.texts.items() if texts is None or k in texts},
            qa={k: v for k, v in self.qa.items() if qa is None or k in qa})


def split_problem(doc: str) -> tuple[str, str]:
    """A ``Question: ...\nAnswer: X`` document as (prompt ending in ``Answer:``, gold answer)."""
    head, _, answer = doc.rpartition("\nAnswer:")
    return f"{head}\nAnswer:", answer.strip()


def qa_pairs(docs: Sequence[str]) -> list[tuple[str, str]]:
    """(prompt ending in ``Answer:``, gold) pairs from ``Question: ...\\nAnswer: N`` documents."""
    return [split_problem(d) for d in docs if "\nAnswer:" in d]


def load_eval_suite(names: Sequence[str] | None = None, split: str = "dev"):
    """An :class:`~optimer_lib.scoring.evaluate.EvalSuite` of corpora (default: every embedded one).

    ``names`` items are embedded corpus names or ``NAME=PATH`` for a user file. Every corpus
    gives texts for perplexity; question/answer corpora (math, or any file whose documents all
    read ``Question: ...\nAnswer: X``) also give exact-match pairs.
    """
    texts: dict[str, list[str]] = {}
    for item in list(names) if names else embedded_corpora():
        name, sep, path = str(item).partition("=")
        if sep and not name:
            raise DataError(f"bad corpus {item!r}: use NAME or NAME=PATH (e.g. legal=data/legal_dev.jsonl)")
        texts[name] = load_corpus(path if sep else name, split)
    qa = {n: qa_pairs(docs) for n, docs in texts.items() if n in QA_TASKS or all("\nAnswer:" in d for d in docs)}
    return EvalSuite(texts=texts, qa=qa)


def pack_tokens(docs: Sequence[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenise documents, join them with EOS, and cut the stream into ``seq_len`` blocks.

    The last partial block is dropped; raises DataError if not even one block results.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    ids = tokenizer(list(docs), add_special_tokens=False, verbose=False)["input_ids"]
    for seq in ids:
        stream.extend(seq)
        if eos is not None:
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(f"dataset too small: {len(stream)} tokens, need at least one block of {seq_len}; "
                        "add more text or lower --seq-len")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
