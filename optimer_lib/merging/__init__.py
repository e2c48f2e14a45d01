"""Merging: the registry of merge methods (pure tensor functions), the resident in-place merger, the pool
(base + vectors opened once) and export of a merged HF checkpoint. Imports only ``checkpoints`` and below.
"""
