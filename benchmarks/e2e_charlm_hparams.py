#!/usr/bin/env python
"""char-LM training step (recipe size) with the recipe's structured GPTs vs the same structures at divisor
hyperparameters (issue 14 analysis, docs/speed_e2e.md). One thread, CPU-time clock by default, interleaved.

    python benchmarks/e2e_charlm_hparams.py --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from e2e import build_gpt, charlm_setup, gpt_step

BLK = r"blocks\.\d+\."
# <= 25% of the weights, blocks dividing the sizes, few large blocks (see e2e_hparams.py)
DIVISOR = {
    "monarch": {BLK + "qkv": {"nblocks": 4, "out_blocks": 4, "rank": 12},     # 256x768: 16*12*(64+192) = 49152 = 25%
                BLK + "proj": {"nblocks": 4, "out_blocks": 4, "rank": 8},      # 256x256: 16*8*128 = 25%
                BLK + "fc1": {"nblocks": 4, "out_blocks": 16, "rank": 8},     # 256x1024: 64*8*128 = 25%
                BLK + "fc2": {"nblocks": 4, "out_blocks": 4, "rank": 12}},    # 1024x256: 16*12*320 = 23.4%
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    import deftly
    from deftly.train import charlm

    cfg = charlm.CharLMConfig()
    vocab, batch, _ = charlm_setup(cfg)
    models = {"dense": build_gpt("dense", None, vocab, cfg)}
    for s in ("lowrank", "blockdiag", "monarch"):
        models[f"{s} (recipe)"] = build_gpt(s, 0.25, vocab, cfg)
    for s, ov in DIVISOR.items():
        m = copy.deepcopy(models["dense"])
        torch.manual_seed(0)
        deftly.structurize(m, deftly.StructureConfig(structure=s, target_modules=BLK + "(qkv|proj|fc1|fc2)",
                                                     init="random", overrides=ov))
        models[f"{s} divisor"] = m.train()
    for k, m in models.items():
        hp = {f"{l.in_features}x{l.out_features}": l.hparams() for l in m.modules()
              if isinstance(l, deftly.StructuredLinear)}
        w = sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks") and ".ln" not in n and not n.endswith("bias"))
        print(k, hp, "block weights", w, flush=True)
    fns = {k: gpt_step(m, batch) for k, m in models.items()}
    for f in fns.values():
        f()
        f()
    ts = {k: [] for k in fns}
    keys = list(fns)
    for r in range(args.rounds):
        for k in (keys if r % 2 == 0 else keys[::-1]):
            t0 = now()
            fns[k]()
            ts[k].append(now() - t0)
    d = statistics.median(ts["dense"])
    for k, v in ts.items():
        t = statistics.median(v)
        print(f"{k:22s} {1e3 * t:8.1f} ms  {d / t:5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
