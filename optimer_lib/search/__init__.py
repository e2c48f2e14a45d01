"""Search of merge weights: the one trial loop, the study record, samplers, pruning, Pareto, re-ranking and
warm starts. Imports ``scoring`` and below; front ends and ``experiments`` sit above it.
"""
