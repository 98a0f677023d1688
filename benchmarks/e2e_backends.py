"""One structurized MiniLM, two kernel backends, end to end: which backend makes the model faster?

    python benchmarks/e2e_backends.py [--structure blockdiag] [--budget 0.25] [--backends kernel blas]
                                      [--batches 32 128] [--tokens 128] [--threads 1] [--rounds 5]

all-MiniLM-L6-v2 with its encoder's linear layers structurized as in ``benchmarks/e2e.py`` (random init:
speed does not depend on values), inference at ``batch x tokens``; the first backend is forced for the
structure in every call of ``A``, the second in every call of ``B`` (``deftly.kernels.use_backend``), and
the two are sampled alternately in one process (``e2e.interleaved``). Prints each backend's time against
dense and ``A / B`` (> 1: the second backend is faster), wall-clock and CPU time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import build_minilm, interleaved, minilm_call, minilm_encode, minilm_texts  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--structure", default="blockdiag")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--backends", nargs=2, default=["kernel", "blas"])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-sample", type=float, default=0.5)
    args = ap.parse_args(argv)
    import deftly
    from deftly.data import minilm

    torch.set_num_threads(args.threads)
    tok, dense = minilm.load()
    dense.eval()
    model = build_minilm(dense, args.structure, args.budget)
    shapes = sorted({(m.in_features, m.out_features, str(m.hparams())) for m in model.modules()
                     if isinstance(m, deftly.StructuredLinear)})
    print(f"MiniLM, {args.structure} at {args.budget:.0%} of the encoder's linear weights, {args.threads} "
          f"thread(s); layer shapes: {'; '.join(f'{i}->{o} {h}' for i, o, h in shapes)}")
    texts, source = minilm_texts(max(args.batches))
    a_name, b_name = args.backends

    def forced(name, fn):
        def call():
            with deftly.kernels.use_backend(name, args.structure):
                return fn()
        return call

    for batch in args.batches:
        enc = minilm_encode(tok, texts, batch, args.tokens)
        run = minilm_call(model, enc)
        fa, fb = forced(a_name, run), forced(b_name, run)
        torch.testing.assert_close(fa(), fb(), rtol=1e-4, atol=1e-4)
        ab = interleaved(fa, fb, args.rounds, args.min_sample)
        da = interleaved(minilm_call(dense, enc), fa, max(3, args.rounds // 2), args.min_sample)
        db = interleaved(minilm_call(dense, enc), fb, max(3, args.rounds // 2), args.min_sample)
        print(f"batch {batch} x {args.tokens} tokens ({source}):\n"
              f"  {a_name:8s} {ab['dense_ms']:8.1f} ms  vs dense {da['speedup']:.2f}x (CPU {da['speedup_cpu']:.2f}x)\n"
              f"  {b_name:8s} {ab['ms']:8.1f} ms  vs dense {db['speedup']:.2f}x (CPU {db['speedup_cpu']:.2f}x)\n"
              f"  {a_name} / {b_name}: {ab['speedup']:.3f} (paired {ab['speedup_paired']:.3f}, CPU "
              f"{ab['speedup_cpu']:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
