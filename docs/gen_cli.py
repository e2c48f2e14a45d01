"""Write docs/cli.md, the reference of every ``optimer`` subcommand, from the argparse parser itself.

    .venv/bin/python docs/gen_cli.py          # rewrites docs/cli.md
    .venv/bin/python docs/gen_cli.py --check  # exit 1 if docs/cli.md is out of date (tests/test_docs.py runs it)
    .venv/bin/python docs/gen_cli.py --stdout # print the page, write nothing
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from optimer_lib.cli import build_parser

OUT = Path(__file__).resolve().parent / "cli.md"

INTRO = """# `optimer` command reference

Generated from the argparse parser in `optimer_lib/cli.py` by `python docs/gen_cli.py` (do not edit by hand;
`tests/test_docs.py` fails when this page and the parser disagree). `optimer SUBCOMMAND --help` prints the same.
Worked examples: the [README](../README.md) tour, [search.md](search.md), [experiments.md](experiments.md).

Every subcommand prints `error: <what to do>` and exits with status 2 on a mistake; `OPTIMER_DEBUG=1` adds the
traceback. Ctrl-C exits with 130 and keeps finished work: re-run the same command to continue.
"""


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def commands(p: argparse.ArgumentParser | None = None, prefix: str = "optimer") -> dict[str, argparse.ArgumentParser]:
    """``{"optimer demo": parser, "optimer vector extract": parser, ...}``: every leaf subcommand."""
    p = p or build_parser()
    out: dict[str, argparse.ArgumentParser] = {}
    for name, sub in _subparsers(p).items():
        nested = _subparsers(sub)
        out.update(commands(sub, f"{prefix} {name}") if nested else {f"{prefix} {name}": sub})
    return out


def _helps(p: argparse.ArgumentParser) -> dict[str, str]:
    out = {}
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                out[choice.dest] = choice.help or ""
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(a: argparse.Action) -> str:
    name = ", ".join(f"`{s}`" for s in a.option_strings) if a.option_strings else f"`{a.metavar or a.dest}`"
    if a.option_strings and a.nargs != 0:
        name += f" `{a.metavar or a.dest.upper()}`" + (" ..." if a.nargs in ("+", "*") else "")
    default = "" if a.default is None or a.default is False or a.default == argparse.SUPPRESS or a.required \
        else f"`{a.default}`"
    if a.required and a.option_strings:
        default = "required"
    if a.choices and not isinstance(a, argparse._SubParsersAction):
        default += (" " if default else "") + "(" + ", ".join(f"`{c}`" for c in a.choices) + ")"
    return f"| {name} | {_cell(default)} | {_cell(a.help or '')} |"


def render() -> str:
    top = build_parser()
    helps = {**_helps(top), **{f"vector {k}": v for k, v in _helps(_subparsers(top)["vector"]).items()}}
    lines = [INTRO, "| command | what it does |", "|---|---|"]
    cmds = commands(top)
    for cmd in cmds:
        key = cmd.removeprefix("optimer ")
        lines.append(f"| [`{cmd}`](#{cmd.replace(' ', '-')}) | {_cell(helps.get(key, ''))} |")
    for cmd, p in cmds.items():
        key = cmd.removeprefix("optimer ")
        usage = "\n".join(textwrap.wrap(" ".join(p.format_usage().removeprefix("usage: ").split()), 110,
                                        subsequent_indent=" " * (len(cmd) + 1), break_on_hyphens=False))
        lines += ["", f"## {cmd}", "", helps.get(key, "") + ".", "", "```text", usage, "```", "",
                  "| argument | default | meaning |", "|---|---|---|"]
        lines += [_row(a) for a in p._actions if not isinstance(a, argparse._HelpAction)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write docs/cli.md from the optimer parser.")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if docs/cli.md is out of date")
    ap.add_argument("--stdout", action="store_true", help="print the page instead of writing docs/cli.md")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    if args.stdout:
        sys.stdout.write(text)
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
