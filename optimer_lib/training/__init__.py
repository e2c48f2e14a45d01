"""Continual pre-training: one model per dataset, or one model on a data mixture. Imports only
``checkpoints`` and ``data`` below it.
"""
