"""Training: a resumable loop, structure-aware μP learning rates, and the recipes built on them.

Import the pieces from their modules: ``deftly.train.loop`` (the loop), ``deftly.train.mup``
(``param_groups``), and the recipes ``deftly.train.fashion``, ``deftly.train.charlm`` and
``deftly.train.minilm``; this package imports nothing heavy itself.
"""
