"""Data-parallel training of a structured MLP on Fashion-MNIST, under DDP or FSDP2, on CPU or GPU.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --strategy fsdp2
    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --strategy ddp --structure lowrank
    python examples/ddp_train.py --strategy none          # one process, same code

Every rank reads the same data and takes its slice of each global batch (``local_slice``), so N ranks
compute exactly the updates of one process with the global batch. At the end the full model and
optimizer state are gathered on rank 0 and written with ``deftly.io.checkpoint.save_checkpoint`` — the file
loads in a single process (``--verify`` does that and re-measures the test accuracy there).
Needs the Debian package ``dataset-fashion-mnist`` (``deftly.data.fashion_mnist``).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import deftly
from deftly import distributed as ddist


def build(structure: str, hidden: int) -> nn.Module:
    p1 = deftly.get(structure).examples(784, hidden)[0]
    p2 = deftly.get(structure).examples(hidden, hidden)[0]
    return nn.Sequential(deftly.make(structure, 784, hidden, **p1), nn.GELU(),
                         deftly.make(structure, hidden, hidden, **p2), nn.GELU(), nn.Linear(hidden, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, info: ddist.DistInfo) -> float:
    """Each rank scores its share of the test set; counts are summed over ranks."""
    model.eval()
    n = len(x) - len(x) % info.world_size
    rows = ddist.local_slice(n, info)
    correct = (model(x[rows].to(info.device)).argmax(-1).cpu() == y[rows]).sum()
    model.train()
    return ddist.all_reduce_mean(float(correct)) * info.world_size / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strategy", choices=ddist.STRATEGIES, default="ddp")
    ap.add_argument("--structure", default="monarch", help=f"one of {', '.join(deftly.structures())}")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", default="runs/ddp_train.ckpt")
    ap.add_argument("--verify", action="store_true", help="rank 0 reloads the checkpoint in one process")
    args = ap.parse_args(argv)

    info = ddist.setup()
    torch.manual_seed(args.seed)  # the same init on every rank
    if info.device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // info.world_size))
    from deftly.data import fashion_mnist

    x_train, y_train = fashion_mnist.tensors("train", limit=args.train_limit)
    x_test, y_test = fashion_mnist.tensors("test")
    model = ddist.wrap_model(build(args.structure, args.hidden), args.strategy,
                             example_input=x_train[: args.global_batch // info.world_size].to(info.device))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)  # after wrap_model (FSDP2 makes new parameters)
    if info.is_main:
        n_params = sum(p.numel() for p in ddist.unwrap(model).parameters())
        print(f"{args.strategy} x {info.world_size} ({info.backend or 'single process'}), {args.structure} "
              f"MLP 784-{args.hidden}-{args.hidden}-10, {n_params} parameters, global batch "
              f"{args.global_batch}, {len(x_train)} training images", flush=True)

    rows = ddist.local_slice(args.global_batch, info)
    order = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(x_train), generator=order)
    pos, t0 = 0, time.perf_counter()
    for step in range(1, args.steps + 1):
        if pos + args.global_batch > len(perm):
            perm, pos = torch.randperm(len(x_train), generator=order), 0
        idx = perm[pos:pos + args.global_batch][rows]  # this rank's share of the global batch
        pos += args.global_batch
        loss = F.cross_entropy(model(x_train[idx].to(info.device)), y_train[idx].to(info.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps:
            mean_loss = ddist.all_reduce_mean(loss.item())
            if info.is_main:
                print(f"step {step:5d}  loss {mean_loss:.4f}  {time.perf_counter() - t0:6.1f} s", flush=True)
    acc = accuracy(model, x_test, y_test, info)
    state = {"model": ddist.full_state_dict(model), "optimizer": ddist.full_optimizer_state_dict(model, opt),
             "structure": args.structure, "hidden": args.hidden, "step": args.steps}
    if info.is_main:
        from deftly.io.checkpoint import load_checkpoint, save_checkpoint

        print(f"test accuracy ({len(x_test) - len(x_test) % info.world_size} images): {acc:.4f}", flush=True)
        path = save_checkpoint(args.checkpoint, state)
        print(f"checkpoint (full state, loads in one process): {path}", flush=True)
        if args.verify:
            single = build(args.structure, args.hidden)
            ddist.load_full_state_dict(single, load_checkpoint(path)["model"], source=str(path))
            single.eval()
            with torch.no_grad():
                acc1 = float((single(x_test).argmax(-1) == y_test).float().mean())
            print(f"reloaded in one process: test accuracy on all {len(x_test)} images {acc1:.4f}", flush=True)
    ddist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
