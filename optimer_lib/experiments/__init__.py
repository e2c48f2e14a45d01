"""Experiments: baselines (data mixtures, merge methods), analyses, cost accounting, the experiment runner
and its report. The top library layer: it may import every layer below, none imports it.
"""
