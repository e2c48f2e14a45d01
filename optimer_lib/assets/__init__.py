"""The embedded tiny world: corpora, tokenizer and models shipped in ``assets/`` (see build.py)."""
