"""Find test assertions that cannot fail (or that assert nothing on some machines), by reading the AST.

    python3 tests/vacuity.py                  # every tests/*.py; exit 1 and one line per finding
    python3 tests/vacuity.py tests/test_x.py  # some files

Rules (each finding names one; ``tests/test_vacuity.py`` holds an example of each):
- ``always-true-or``: an ``or`` with an operand that holds whenever the assert is reached, such as
  ``"x" in p.read_text() or p.is_file()`` (the file was just read, so it exists) or ``... or True``.
- ``number-substring``: ``"1.000" in text``: a number looked up as a substring matches anywhere (the
  diagonal of a table, a longer number); parse the value and compare it with one computed independently.
- ``range-only``: ``0 <= x <= 1`` (the whole range of a proportion; also [-1, 1] and [0, 100]) is the only
  assertion about ``x`` in the test: any value of the right kind passes; compare ``x`` with an expected
  value. A narrower range (``0.6 < share < 0.9``) is a tolerance and passes.
- ``conditional-assert``: ``if name:`` (or ``name is not None``) on a value the test computed, guarding
  every assertion in its body, with no ``else``: where the condition is false the test asserts nothing.
- ``constant``: ``assert True``, ``assert "text"``, ``assert (x, "message")``: true whatever happens.
- ``self-compare``: both sides of a comparison are the same expression (``x == x``).
- ``trivial-bound``: ``len(x) >= 0``, ``abs(x) >= 0``, ``isinstance(x, object)``.

A justified case is kept with ``# vacuity: ok (reason)`` on a line of the statement (for an ``if``, its
first line); an opt-out without a reason is itself a finding. Standard library only: CI runs it first.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_OPT_OUT = re.compile(r"#\s*vacuity:\s*ok\b(.*)$")
_REASON = re.compile(r"^\s*\(\s*\S.*\)")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?%?$")
_EXISTS = {"is_file", "exists", "is_dir"}
_READS = {"read_text", "read_bytes", "open", "stat", "iterdir"}
_ORDER = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
# The whole range a proportion, a cosine or a percentage can take: bounding a value by it checks its kind only.
_NATURAL = {(0.0, 1.0), (-1.0, 1.0), (0.0, 100.0)}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


def _src(node: ast.AST) -> str:
    return ast.unparse(node)


def _and_operands(test: ast.expr) -> list[ast.expr]:
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return [x for v in test.values for x in _and_operands(v)]
    return [test]


def _has_call(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) for n in ast.walk(node))


def _is_const(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _is_const(node.operand)
    return False


def _bounds(lo: ast.AST, hi: ast.AST) -> tuple[float, float] | None:
    """``(lo, hi)`` when both are numeric constants (``-1`` included), in increasing order."""
    values = []
    for node in (lo, hi):
        if not _is_const(node):
            return None
        try:
            values.append(float(ast.literal_eval(node)))
        except (ValueError, TypeError, SyntaxError):
            return None
    return (min(values), max(values))


def _read_receivers(nodes: Iterable[ast.AST]) -> set[str]:
    """Source text of every path-like expression read in ``nodes`` (``p.read_text()``, ``open(p)``)."""
    found = set()
    for root in nodes:
        for n in ast.walk(root):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in _READS:
                found.add(_src(n.func.value))
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "open" and n.args:
                found.add(_src(n.args[0]))
    return found


def _always_true(operand: ast.expr, read: set[str]) -> str | None:
    if isinstance(operand, ast.Constant) and operand.value:
        return f"'{_src(operand)}' is always true"
    if (isinstance(operand, ast.Call) and isinstance(operand.func, ast.Attribute) and operand.func.attr in _EXISTS
            and _src(operand.func.value) in read):
        return f"'{_src(operand)}' holds whenever '{_src(operand.func.value)}' could be read"
    return None


class _TestChecker(ast.NodeVisitor):
    """Checks one module; ``findings`` collects what it sees."""

    def __init__(self, path: str, lines: Sequence[str]) -> None:
        self.path, self.lines, self.findings = path, lines, []
        self._earlier: list[ast.stmt] = []  # statements of the current function before the current one

    # --- reporting -------------------------------------------------------------------------------------
    def _opted_out(self, node: ast.AST, first_line_only: bool = False) -> bool:
        end = node.lineno if first_line_only else (getattr(node, "end_lineno", None) or node.lineno)
        for no in range(node.lineno, end + 1):
            m = _OPT_OUT.search(self.lines[no - 1]) if no - 1 < len(self.lines) else None
            if m:
                if not _REASON.match(m.group(1)):
                    self.findings.append(Finding(self.path, no, "opt-out-without-reason",
                                                 "write why: '# vacuity: ok (reason)'"))
                return True
        return False

    def _report(self, node: ast.AST, rule: str, message: str, first_line_only: bool = False) -> None:
        if not self._opted_out(node, first_line_only):
            self.findings.append(Finding(self.path, node.lineno, rule, message))

    # --- functions -------------------------------------------------------------------------------------
    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name.startswith("test"):
            self._check_ranges(node)
            self._check_conditionals(node)
        saved, self._earlier = self._earlier, []
        for stmt in node.body:
            self.visit(stmt)
            self._earlier.append(stmt)
        self._earlier = saved

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    # --- single assert statements --------------------------------------------------------------------
    def visit_Assert(self, node: ast.Assert) -> None:
        test = node.test
        if isinstance(test, ast.Constant) and test.value or isinstance(test, (ast.Tuple, ast.JoinedStr)) and (
                not isinstance(test, ast.Tuple) or test.elts):
            self._report(node, "constant", f"'assert {_src(test)}' is true whatever the code does")
            return
        for part in _and_operands(test):
            self._check_part(node, part)

    def _check_part(self, node: ast.Assert, part: ast.expr) -> None:
        if isinstance(part, ast.BoolOp) and isinstance(part.op, ast.Or):
            read = _read_receivers([node.test, *self._earlier])
            for operand in part.values:
                why = _always_true(operand, read)
                if why:
                    self._report(node, "always-true-or", f"'{_src(part)}' cannot fail: {why}")
                    return
        if isinstance(part, ast.Compare):
            left, ops, rights = part.left, part.ops, part.comparators
            if (len(ops) == 1 and isinstance(ops[0], ast.In) and isinstance(left, ast.Constant)
                    and isinstance(left.value, str) and _NUMBER.match(left.value.strip())):
                self._report(node, "number-substring", f"'{_src(part)}': the number {left.value!r} may appear "
                             "anywhere in the text; parse the value and compare it with an expected one")
            sides = [left, *rights]
            for a, op, b in zip(sides[:-1], ops, sides[1:], strict=True):
                if (isinstance(op, (ast.Eq, ast.Is, ast.LtE, ast.GtE)) and ast.dump(a) == ast.dump(b)
                        and not _has_call(a)):
                    self._report(node, "self-compare", f"'{_src(part)}' compares an expression with itself")
                if (isinstance(op, ast.GtE) and isinstance(a, ast.Call) and isinstance(a.func, ast.Name)
                        and a.func.id in ("len", "abs") and isinstance(b, ast.Constant) and b.value == 0):
                    self._report(node, "trivial-bound", f"'{_src(part)}' holds for every value")
        if (isinstance(part, ast.Call) and isinstance(part.func, ast.Name) and part.func.id == "isinstance"
                and len(part.args) == 2 and isinstance(part.args[1], ast.Name) and part.args[1].id == "object"):
            self._report(node, "trivial-bound", f"'{_src(part)}' holds for every value")

    # --- whole-test rules ------------------------------------------------------------------------------
    def _check_ranges(self, fn: ast.FunctionDef) -> None:
        """``lo <= x <= hi`` (constant bounds) as the only assertion that mentions ``x``."""
        asserts = [n for n in ast.walk(fn) if isinstance(n, ast.Assert)]
        for node in asserts:
            parts = _and_operands(node.test)
            if not all(isinstance(p, ast.Compare) and len(p.ops) == 2 and all(isinstance(o, _ORDER) for o in p.ops)
                       and _bounds(p.left, p.comparators[1]) in _NATURAL for p in parts):
                continue
            for p in parts:
                target = p.comparators[0]  # type: ignore[attr-defined]
                if not isinstance(target, ast.Name):
                    continue
                others = [a for a in asserts if a is not node]
                used = any(isinstance(n, ast.Name) and n.id == target.id for a in others for n in ast.walk(a))
                if not used:
                    self._report(node, "range-only", f"'{_src(p)}' is the only check of '{target.id}' and spans "
                                 "every value of its kind; compare it with an expected value")

    def _check_conditionals(self, fn: ast.FunctionDef) -> None:
        """``if x:`` on a computed value, guarding assertions, with no ``else``."""
        assigned: set[str] = set()
        for stmt in _statements(fn.body):
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(getattr(stmt, "value", None), ast.expr):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if stmt.value is not None and _has_call(stmt.value):
                    assigned |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            if not isinstance(stmt, ast.If) or stmt.orelse:
                continue
            name = _guard_name(stmt.test)
            if name in assigned and _asserts_in(stmt.body):
                self._report(stmt, "conditional-assert", f"'if {_src(stmt.test)}:' guards the assertions in its "
                             f"body with no else: when '{name}' is empty the test asserts nothing",
                             first_line_only=True)


def _statements(body: Sequence[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements in source order, entering with/try/for blocks (not nested functions or classes)."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(stmt, field, None)
            if isinstance(inner, list) and not isinstance(stmt, ast.If):
                yield from _statements(inner)
        for handler in getattr(stmt, "handlers", []) or []:
            yield from _statements(handler.body)


def _guard_name(test: ast.expr) -> str | None:
    if isinstance(test, ast.Name):
        return test.id
    if (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.IsNot)
            and isinstance(test.left, ast.Name) and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value is None):
        return test.left.id
    return None


def _asserts_in(body: Sequence[ast.stmt]) -> bool:
    for stmt in body:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Assert):
                return True
            if isinstance(n, ast.Call) and _src(n.func) in ("pytest.raises", "raises", "pytest.fail"):
                return True
    return False


def check_source(source: str, path: str = "<string>") -> list[Finding]:
    """Every finding in one module's source."""
    checker = _TestChecker(path, source.splitlines())
    checker.visit(ast.parse(source, filename=path))
    return sorted(set(checker.findings), key=lambda f: (f.line, f.rule))


def check_paths(paths: Iterable[Path]) -> list[Finding]:
    return [f for p in paths for f in check_source(Path(p).read_text(encoding="utf-8"), str(p))]


def default_paths() -> list[Path]:
    here = Path(__file__).resolve().parent
    return sorted(p for p in here.glob("*.py") if p.name.startswith("test_") or p.name == "conftest.py")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    paths = [Path(a) for a in args] or default_paths()
    findings = check_paths(paths)
    for f in findings:
        print(f)
    print(f"vacuity: {len(findings)} assertion(s) that cannot fail in {len(paths)} file(s)",
          file=sys.stderr if findings else sys.stdout)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
