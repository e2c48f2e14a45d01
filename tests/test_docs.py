"""Every command the README and docs/ show parses with the real parser, every file they point at exists, every
link resolves, and docs/cli.md is the parser's own reference (regenerate it with ``python docs/gen_cli.py``).

A shown ``optimer ...`` command is parsed in full by ``optimer_lib.cli.build_parser()`` (nothing runs); one
with a ``...`` placeholder must name an existing subcommand whose ``--help`` works, and use only its options.
``accelerate launch ... -m optimer_lib.cli ...`` is checked the same way, ``make X`` against the Makefile,
``python -m MODULE`` by importing the module. The commands' effects are the other tests' business (the demo,
the CLI, the wheel install...).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from optimer_lib.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IDS = [str(p.relative_to(ROOT)) for p in DOCS]
REPO_DIRS = ("assets", "bench", "configs", "docs", "examples", "notebooks", "tests", "optimer_lib", "workbench",
             ".ci")


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- docs/cli.md --------------------------------------------------------------------------------------------------
def test_cli_md_lists_exactly_the_parsers_subcommands_and_options():
    gen = _gen_cli()
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## (optimer [\w -]+)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    cmds = gen.commands()
    assert set(sections) == set(cmds), "regenerate docs/cli.md: python docs/gen_cli.py"
    for cmd, parser in cmds.items():
        shown = set(re.findall(r"`(--?[\w-]+)`", sections[cmd])) - {"-h"}
        real = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
        assert shown == real, f"{cmd}: regenerate docs/cli.md (python docs/gen_cli.py)"


def test_cli_md_is_up_to_date():
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == _gen_cli().render(), \
        "docs/cli.md differs from the parser: run python docs/gen_cli.py"


# -- commands in code blocks --------------------------------------------------------------------------------------
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_SEPARATORS = {";", "&&", "||", "&", "|", "(", ")"}
_KEYWORDS = {"for", "do", "done", "then", "fi", "if", "wait", "in"}


def shell_commands(markdown: str) -> list[list[str]]:
    """Simple commands (token lists) of the shell code blocks: continuations joined, comments and operators
    dropped, ``NAME=value`` prefixes and loop keywords skipped, ``$VAR`` read as ``0``."""
    out = []
    for lang, body in _FENCE.findall(markdown):
        if lang not in ("bash", "sh", "shell", "console"):  # usage synopses and diagrams are ```text
            continue
        for line in body.replace("\\\n", " ").splitlines():
            lex = shlex.shlex(re.sub(r"\$\{?\w+\}?", "0", line.removeprefix("$ ")), posix=True,
                              punctuation_chars=True)
            lex.whitespace_split, lex.commenters = True, "#"
            cmd: list[str] = []
            for tok in [*lex, ";"]:
                if tok in _SEPARATORS:
                    while cmd and (cmd[0] in _KEYWORDS or re.fullmatch(r"\w+=\S*", cmd[0])):
                        cmd = [] if cmd[0] == "for" else cmd[1:]  # a loop header is no command
                    if cmd:
                        out.append(cmd)
                    cmd = []
                else:
                    cmd.append(tok)
    return out


def _leaf(parser: argparse.ArgumentParser, args: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The subcommand parser ``args`` start with, and the words naming it."""
    words = []
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or not args or args[0] not in subs[0].choices:
            return parser, words
        parser, words, args = subs[0].choices[args[0]], [*words, args[0]], args[1:]


def check_optimer(args: list[str]) -> str | None:
    """None if ``optimer ARGS`` parses (or, with ``...``, names a real subcommand and its options)."""
    parser = build_parser()
    leaf, words = _leaf(parser, args)
    if not words or leaf is parser:
        return f"optimer {' '.join(args)}: no such subcommand"
    err = io.StringIO()
    if "..." in args:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), \
                pytest.raises(SystemExit) as exc:
            parser.parse_args([*words, "--help"])
        known = {s for a in leaf._actions for s in a.option_strings}
        unknown = [a.split("=")[0] for a in args if a.startswith("-") and a.split("=")[0] not in known]
        return f"optimer {' '.join(words)}: unknown option(s) {unknown}" if unknown or exc.value.code else None
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(args)
    except SystemExit:
        return f"optimer {' '.join(args)}: {err.getvalue().strip().splitlines()[-1]}"
    return None


def check_command(cmd: list[str]) -> str | None:
    name = Path(cmd[0]).name
    if name == "optimer":
        return check_optimer(cmd[1:])
    if name == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        missing = [t for t in cmd[1:] if not t.startswith("-") and "=" not in t and t not in targets]
        return f"make: no target(s) {missing}" if missing else None
    if "-m" in cmd[:-1]:  # python -m MODULE ..., accelerate launch ... -m MODULE ...
        module, rest = cmd[cmd.index("-m") + 1], cmd[cmd.index("-m") + 2:]
        if module == "optimer_lib.cli":
            return check_optimer(rest)
        if module.split(".")[0] in ("optimer_lib", "workbench") and importlib.util.find_spec(module) is None:
            return f"python -m {module}: no such module"
    return None


def test_command_extraction():
    md = ("```bash\nfor seed in 0 1; do\n  optimer search --seed $seed \\\n    --trials 3 &  # a worker\ndone; wait\n"
          "OMP_NUM_THREADS=1 make test ARGS=-x && pip install x | tee log\n```\n"
          "```python\noptimer = 1\n```\n")
    assert shell_commands(md) == [["optimer", "search", "--seed", "0", "--trials", "3"], ["make", "test", "ARGS=-x"],
                                  ["pip", "install", "x"], ["tee", "log"]]


def test_the_checker_catches_wrong_commands():
    assert check_optimer(["demo", "--quick", "--workdir", "runs/q"]) is None
    assert "no such subcommand" in check_optimer(["demos", "--quick"])
    assert "unrecognized arguments" in check_optimer(["demo", "--quik"])
    assert "required" in check_optimer(["merge", "--base", "b"])
    assert "--no-such" in check_optimer(["search", "...", "--no-such", "1"])
    assert check_optimer(["vector", "info", "..."]) is None
    assert "no target" in check_command(["make", "demox"])
    assert "no such module" in check_command(["python", "-m", "optimer_lib.nope"])
    assert check_command(["accelerate", "launch", "-m", "optimer_lib.cli", "train", "..."]) is None


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_shown_command_parses(doc):
    cmds = shell_commands(doc.read_text(encoding="utf-8"))
    problems = [p for p in map(check_command, cmds) if p]
    assert problems == []


def test_the_readme_tour_shows_the_front_ends():
    cmds = [" ".join(c) for c in shell_commands((ROOT / "README.md").read_text(encoding="utf-8"))]
    for start in ("make demo", "make test", "optimer demo", "optimer search", "optimer workbench", "optimer merge",
                  ".venv/bin/jupyter lab notebooks/"):
        assert any(c.startswith(start) for c in cmds), start
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


# -- files and links ----------------------------------------------------------------------------------------------
_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(d) for d in REPO_DIRS) + r")/[\w./*-]*)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def repo_paths(markdown: str) -> set[str]:
    """Repository paths in code blocks and inline code (``assets/base``, ``tests/test_x.py``, globs too)."""
    code = " ".join([b for _, b in _FENCE.findall(markdown)] + re.findall(r"`([^`\n]+)`", _FENCE.sub("", markdown)))
    return {m.rstrip(".:,") for m in _PATH.findall(code)}


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_path_and_slug_helpers():
    md = "see `tests/test_x.py:12` and\n```bash\noptimer merge --base assets/base --out runs/m\n```\n" \
         "and `lmeval:examples/lmeval/a.yaml:acc`, not `my/tests/x`"
    assert repo_paths(md) == {"tests/test_x.py", "assets/base", "examples/lmeval/a.yaml"}
    assert _slug("From a slider move to a merged tensor") == "from-a-slider-move-to-a-merged-tensor"
    assert _slug("Files others can read, in places you chose") == "files-others-can-read-in-places-you-chose"


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_referenced_file_exists(doc):
    missing = [p for p in sorted(repo_paths(doc.read_text(encoding="utf-8"))) if not glob.glob(str(ROOT / p))]
    assert missing == []


@pytest.mark.parametrize("doc", DOCS, ids=IDS)
def test_every_link_resolves(doc):
    bad = []
    for target in _LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"\w+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            bad.append(target)
        elif anchor and file.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", _FENCE.sub("", file.read_text(encoding="utf-8")),
                                                   re.M)}
            if anchor not in slugs:
                bad.append(target)
    assert bad == []
