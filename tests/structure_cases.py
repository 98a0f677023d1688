"""Test data for the generic suite, kept out of the library classes.

``BAD_EXAMPLES[name]``: hyperparameter sets that ``deftly.make(name, 16, 16, **hp)`` must refuse with a
``ValueError``/``TypeError`` whose message names the bad parameter (tests/test_generic.py). Every registered
structure needs an entry (tests/test_generic.py checks it); a structure with hyperparameters needs at least
one bad set, and one with a ``rank`` lists a rank above its 16x16 bound (tests/test_fuzz_surgery.py).
"""

from __future__ import annotations

from typing import Any

BAD_EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "banded": [{"lower": -1}, {"upper": -2}, {"lower": 16}, {"upper": 16}, {"lower": 1.5}, {"upper": "1"}],
    "blockdiag": [{"nblocks": 0}, {"nblocks": 17}, {"nblocks": "4"}],
    "blocktridiag": [{"block": 0}, {"block": -4}, {"block": 17}, {"block": 2.0}],
    "btt": [{"ncores": 1}, {"ncores": 2.0}, {"rank": 0}, {"in_factors": (3, 5)},
            {"out_factors": (4, 2, 1), "ncores": 2}, {"in_factors": (4, 4), "out_factors": (2, 2, 4)},
            {"in_factors": "44"}, {"ncores": 2, "rank": 5}],
    "butterfly": [{"depth": 0}, {"depth": 1.5}, {"init": "fourier"}, {"init": "fft", "complex": False},
                  {"perm": "random"}, {"complex": "yes"}, {"real_output": True, "complex": False},
                  {"init_norm": "unitary", "init": "fft"}],
    "dense": [],  # no hyperparameters
    "kronecker": [{"in_factors": (3, 5)}, {"out_factors": (2, 2)}, {"in_factors": (4, 2, 2)},
                  {"out_factors": (0, 16)}, {"in_factors": 16}, {"rank": 0}, {"rank": 1.0}, {"rank": 17}],
    "lowrank": [{"rank": 0}, {"rank": -3}, {"rank": 2.5}, {"rank": 17}],
    "lrbd": [{"rank": 0}, {"rank": 17}, {"nblocks": 0}, {"nblocks": 17}],
    "monarch": [{"nblocks": 0}, {"nblocks": 17}, {"out_blocks": 17}, {"rank": 0}, {"rank": -1},
                {"nblocks": 4, "out_blocks": 4, "rank": 5}],
}
