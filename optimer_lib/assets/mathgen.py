"""A seeded generator of arithmetic word problems with checkable numeric answers.

    from optimer_lib.assets.mathgen import generate_problems
    for q, a in generate_problems(3, seed=0): print(q, a)

Each document reads ``"Question: <q>\\nAnswer: <a>"``; evaluation prompts with the text up
to ``Answer:`` and compares the first number generated with ``<a>`` (exact match).
"""

from __future__ import annotations

import random

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Emi", "Farid", "Gita", "Hugo", "Ines", "Jun", "Kofi", "Lena"]
_ITEMS = ["apples", "books", "coins", "pens", "stamps", "cards", "shells", "marbles", "tickets", "eggs"]


def _problem(rng: random.Random) -> tuple[str, int]:
    kind = rng.randrange(7)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if kind == 0:
        return f"What is {a} + {b}?", a + b
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", a - b
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", a * b
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if kind == 3:
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    if kind == 4:
        a, b = max(a, b), min(a, b)
        return f"{name} had {a} {item} and gave away {b}. How many {item} are left?", a - b
    if kind == 5:
        n, k = rng.randint(2, 9), rng.randint(2, 12)
        return f"{name} buys {n} boxes with {k} {item} in each box. How many {item} is that?", n * k
    c = rng.randint(1, 30)
    return f"What is {a} + {b} + {c}?", a + b + c


def generate_problems(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct (question, answer) pairs, deterministic for a given seed."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    while len(out) < n:
        q, a = _problem(rng)
        if q not in seen:
            seen.add(q)
            out.append((q, str(a)))
    return out


def format_problem(question: str, answer: str) -> str:
    return f"Question: {question}\nAnswer: {answer}"


