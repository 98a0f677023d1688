"""deftly's benchmark suite; the same code as ``deftly bench`` (see ``src/deftly/bench.py``).

    python benchmarks/bench.py            # quick subset, ~2 min on 2 cores
    python benchmarks/bench.py --full     # the whole grid
"""

import sys

from deftly.bench import main

if __name__ == "__main__":
    sys.exit(main())
