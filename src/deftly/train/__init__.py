"""Training: a resumable loop, structure-aware μP learning rates, and the recipes built on them.

Import the pieces from their modules (``deftly.train.loop``, ``deftly.train.mup``,
``deftly.train.recipes``); this package imports nothing heavy itself.
"""
