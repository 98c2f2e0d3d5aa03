"""Parameter counts and measured memory of a LLaMA with dense, SLTrain and SST attention/MLP layers.

For each parameterization: parameters (trainable) and stored numbers (parameters + buffers, e.g.
SST's frozen singular vectors), and one AdamW training step measured tensor by tensor (on a CPU:
``lrtrain.memory.TensorMemoryTracker``; on CUDA: the allocator's peak): the bytes held between
forward and backward, the optimizer state, and the step's peak. Ratios are to dense.

    python scripts/bench_param.py                          # llama_60m, the SLTrain/SST 60M recipe (rank 128)
    python scripts/bench_param.py --model llama_130m --rank 256 --alpha 16
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lrtrain.memory import PeakMemory, TensorMemoryTracker, format_bytes, module_bytes, state_bytes
from lrtrain.models import build_model
from lrtrain.param import SSTController, convert


def measure(kind: str, args) -> dict:
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=args.vocab, max_position_embeddings=args.seq)
    if kind == "sltrain":
        convert(model, "sltrain", rank=args.rank, alpha=args.alpha, sparsity=args.sparsity)
    elif kind == "sst":
        convert(model, "sst", rank=args.rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    controller = SSTController(model, optimizer) if kind == "sst" else None
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))

    def loss_of(batch):
        return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())

    for _ in range(2):  # the optimizer's state exists from here on
        loss_of(tokens).backward()
        optimizer.step()
        if controller is not None:
            controller.step()
        optimizer.zero_grad(set_to_none=True)
    existing = [*model.parameters(), *model.buffers(), tokens,
                *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))]
    held = TensorMemoryTracker()
    held.track(*existing)
    before = held.current
    with held:
        loss = loss_of(tokens)
    held_bytes = held.current - before  # what autograd keeps for the backward pass (and the loss)
    del loss
    start = time.perf_counter()
    with PeakMemory("cpu", existing) as peak:
        loss_of(tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sizes = module_bytes(model)
    return {
        "kind": kind,
        "params": sum(p.numel() for p in model.parameters()),
        "stored": sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()),
        "weights": sizes["params"] + sizes["buffers"],
        "held": held_bytes,
        "state": state_bytes(optimizer)["total"],
        "peak": peak.bytes,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_60m")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--sparsity", type=float, default=0.03)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    rows = [measure(kind, args) for kind in ("dense", "sltrain", "sst")]
    dense = rows[0]
    print(f"{args.model}, vocab {args.vocab}, rank {args.rank} "
          f"(SLTrain alpha {args.alpha:g}, sparsity {args.sparsity}), "
          f"attention and MLP layers converted; one AdamW step on {args.batch} x {args.seq} tokens, fp32, CPU, "
          f"torch {torch.__version__}\n")
    print("| layers | parameters | stored numbers | weights | held for backward | optimizer state | step peak "
          "| step time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        def cell(key, fmt=format_bytes, r=r):
            ratio = f" ({r[key] / dense[key]:.2f}×)" if r is not dense else ""
            return f"{fmt(r[key])}{ratio}"

        millions = lambda n: f"{n / 1e6:.1f}M"  # noqa: E731
        print(f"| {r['kind']} | {cell('params', millions)} | {cell('stored', millions)} | "
              f"{cell('weights')} | {cell('held')} | {cell('state')} | {cell('peak')} | {r['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
