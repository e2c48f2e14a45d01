"""Scoring: dev-set evaluation, objectives, lm-evaluation-harness tasks, and the one trial scorer that
decides what a trial measures at each fidelity and what it costs. Imports ``merging`` and below.
"""
