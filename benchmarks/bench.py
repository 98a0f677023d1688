"""deftly's benchmark suite with the issues' speed targets; the suite itself is ``deftly bench``
(``src/deftly/bench/``), the thresholds are in ``benchmarks/targets.py``.

    python benchmarks/bench.py            # quick subset, ~6 min on 2 cores
    python benchmarks/bench.py --full     # the whole grid
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from targets import evaluate_targets

from deftly.bench import main

if __name__ == "__main__":
    sys.exit(main(targets=evaluate_targets))
