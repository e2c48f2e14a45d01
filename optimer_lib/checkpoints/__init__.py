"""Checkpoints and distribution vectors: loading models, τ = θ_tuned − θ_base, GGUF import, streaming I/O.

The lowest layer above ``errors``/``fileio``/``data``: nothing here imports merging, scoring or search.
"""
