"""Every built-in structure; importing this package registers them all."""

from . import blockdiag, dense, lowrank  # noqa: F401
