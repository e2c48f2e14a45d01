"""A small synthetic instruction set, so the embedded world has an instruction-tuned model.

    from optimer_lib.assets.instruct import instruction_conversations
    convs = instruction_conversations(2000, seed=0, corpora={"ja": [...], ...})

Each conversation is a list of chat messages; the tokenizer's chat template renders it.
Tasks: arithmetic with the answer first, echoing, short continuations of each corpus
(so chat works in every language) and tiny Python functions.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from optimer_lib.assets.mathgen import generate_problems

_FUNCS = [
    ("adds two numbers", "def add(a, b):\n    return a + b"),
    ("returns the largest item of a list", "def largest(items):\n    return max(items)"),
    ("reverses a string", "def reverse(s):\n    return s[::-1]"),
    ("counts the vowels in a string", "def vowels(s):\n    return sum(ch in 'aeiou' for ch in s.lower())"),
    ("squares every number in a list", "def squares(xs):\n    return [x * x for x in xs]"),
    ("checks whether a number is even", "def is_even(n):\n    return n % 2 == 0"),
    ("joins words with spaces", "def join_words(words):\n    return ' '.join(words)"),
    ("returns the length of a list", "def size(items):\n    return len(items)"),
]
_LANG = {"en": "English", "ja": "Japanese", "zh": "Chinese", "code": "Python"}


def instruction_conversations(n: int, seed: int, corpora: Mapping[str, Sequence[str]]) -> list[list[dict]]:
    rng = random.Random(seed)
    problems = generate_problems(n, seed=seed + 99991)  # a seed disjoint from the math corpus' one
    convs = []
    for i in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            q, a = problems[i]
            convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {a}."}])
        elif kind == 1:
            lang = rng.choice([k for k in _LANG if k in corpora])
            doc = rng.choice(corpora[lang])
            cut = max(10, len(doc) // 3)
            convs.append([{"role": "user", "content": f"Continue this {_LANG[lang]} text:\n{doc[:cut]}"},
                          {"role": "assistant", "content": doc[cut:cut + 200]}])
        elif kind == 2:
            what, code = rng.choice(_FUNCS)
            convs.append([{"role": "user", "content": f"Write a Python function that {what}."},
                          {"role": "assistant", "content": code}])
        else:
            words = " ".join(rng.choice(corpora.get("en", ["hello world"])).split()[:8])
            convs.append([{"role": "user", "content": f"Repeat after me: {words}"},
                          {"role": "assistant", "content": words}])
    return convs
