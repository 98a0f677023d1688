"""``python -m deftly ...`` (and ``torchrun --nproc_per_node=N -m deftly train ...``): the ``deftly`` CLI."""

import sys

from .cli import main

sys.exit(main())
