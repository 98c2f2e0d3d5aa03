"""Optimizer step time on LLaMA linear shapes, lrtrain against the reference packages, side by side.

For each optimizer two instances are timed on the same gradients: one that refreshes its subspace
on every step (``update_proj_gap=1``: the refresh step) and one that never refreshes after its
first step (the steady step). Rounds interleave the optimizers, and each figure is a median over
rounds, so a noisy shared machine slows all of them alike. The amortised step is
``(refresh + (gap - 1) · steady) / gap``. Ratios are printed from this one run.

    python scripts/bench_optim.py                      # LLaMA-60M shapes, rank 128, gap 200
    python scripts/bench_optim.py --model llama_130m --rank 256 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from lrtrain.memory import format_bytes, state_bytes
from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW

# hidden, intermediate, layers (ALGORITHMS.md §0.1)
SIZES = {"llama_60m": (512, 1376, 8), "llama_130m": (768, 2048, 12), "llama_350m": (1024, 2736, 24)}


def linear_shapes(model: str) -> list[tuple[int, int]]:
    """(out, in) of every attention and MLP weight: q, k, v, o, gate, up, down per layer."""
    hidden, ffn, layers = SIZES[model]
    return [(hidden, hidden)] * 4 * layers + [(ffn, hidden)] * 2 * layers + [(hidden, ffn)] * layers


def _reference_classes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fira
        import galore_torch
    return galore_torch.GaLoreAdamW, fira.FiraAdamW


class GemmFloor(torch.optim.Optimizer):
    """Not an optimizer: the two rank-r matmuls a GaLore step cannot avoid (R = G Qᵀ or Pᵀ G, then
    W += N Q or P N into the weight) with a fixed random basis and nothing else. Its time is the
    floor under any GaLore implementation that uses fp32 GEMMs."""

    def __init__(self, params, rank: int):
        super().__init__(params, {})
        for p in self.param_groups[0]["params"]:
            side_dim = p.shape[1] if p.shape[0] >= p.shape[1] else p.shape[0]
            self.state[p]["basis"] = torch.linalg.qr(torch.randn(side_dim, rank))[0]  # (d, r)

    @torch.no_grad()
    def step(self, closure=None):
        for p in self.param_groups[0]["params"]:
            q = self.state[p]["basis"]
            if p.shape[0] >= p.shape[1]:
                p.addmm_(p.grad @ q, q.T, alpha=-1e-9)
            else:
                p.addmm_(q, q.T @ p.grad, alpha=-1e-9)


def build(name: str, params: list[nn.Parameter], rank: int, gap: int) -> torch.optim.Optimizer:
    lowrank = {"rank": rank, "update_proj_gap": gap, "proj_type": "std"}
    galore_ref, fira_ref = _reference_classes()
    if name == "GEMM floor (2 fp32 matmuls/matrix)":
        return GemmFloor(params, rank)
    if name == "torch AdamW (foreach)":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True)
    if name == "galore-torch GaLoreAdamW":
        return galore_ref([{"params": params, **lowrank, "scale": 0.25}], lr=1e-3, no_deprecation_warning=True)
    if name == "fira FiraAdamW":
        return fira_ref([{"params": params, **lowrank, "alpha": 0.25}], lr=1e-3, no_deprecation_warning=True)
    cls = {"lrtrain GaLoreAdamW": GaLoreAdamW, "lrtrain FiraAdamW": FiraAdamW, "lrtrain FrugalAdamW": FrugalAdamW}[name]
    return cls([{"params": params, **lowrank}], lr=1e-3, weight_decay=0.0)


DEFAULT_OPTIMIZERS = [
    "GEMM floor (2 fp32 matmuls/matrix)",
    "torch AdamW (foreach)",
    "galore-torch GaLoreAdamW",
    "lrtrain GaLoreAdamW",
    "fira FiraAdamW",
    "lrtrain FiraAdamW",
    "lrtrain FrugalAdamW",
]


def _refreshes(name: str) -> bool:
    return name.startswith(("lrtrain", "galore", "fira"))


def _timed_step(opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def run(model: str, rank: int, gap: int, rounds: int, steady_steps: int, names: list[str]) -> list[dict]:
    torch.manual_seed(0)
    shapes = linear_shapes(model)
    weights = [torch.randn(s) * 0.02 for s in shapes]
    grads = [torch.randn(s) for s in shapes]

    def instance(name, gap_):
        params = [nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g  # read-only in every optimizer benchmarked here
        opt = build(name, params, rank, gap_)
        opt.step()  # state initialisation and the first refresh are not timed
        return opt

    refreshing = {n: instance(n, 1) for n in names if _refreshes(n)}
    steady = {n: instance(n, 10**9) for n in names}
    times = {n: {"steady": [], "refresh": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name]["steady"].append(statistics.median(_timed_step(steady[name]) for _ in range(steady_steps)))
            if name in refreshing:
                times[name]["refresh"].append(_timed_step(refreshing[name]))
    rows = []
    for name in names:
        steady_s = statistics.median(times[name]["steady"])
        refreshes = _refreshes(name)
        refresh_s = statistics.median(times[name]["refresh"]) if refreshes else steady_s
        rows.append({
            "optimizer": name,
            "steady_ms": 1e3 * steady_s,
            "refresh_ms": 1e3 * refresh_s,
            "amortised_ms": 1e3 * (refresh_s + (gap - 1) * steady_s) / gap,
            "state": state_bytes(steady[name])["total"] if name.startswith(("lrtrain", "torch")) else None,
            "refreshes": refreshes,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| optimizer | steady step (ms) | refresh step (ms) | amortised step (ms) | state |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        if row["optimizer"].startswith("GEMM"):
            state = "-"
        else:
            state = format_bytes(row["state"]) if row["state"] is not None else "(objects)"
        refresh = f"{row['refresh_ms']:.0f}" if row["refreshes"] else "-"
        lines.append(f"| {row['optimizer']} | {row['steady_ms']:.1f} | {refresh} | "
                     f"{row['amortised_ms']:.1f} | {state} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    by = {row["optimizer"]: row for row in rows}
    out = []
    pairs = [("GEMM floor (2 fp32 matmuls/matrix)", "torch AdamW (foreach)", "steady_ms", None),
             ("lrtrain GaLoreAdamW", "galore-torch GaLoreAdamW", "amortised_ms", "<= 1.00"),
             ("lrtrain GaLoreAdamW", "galore-torch GaLoreAdamW", "steady_ms", "<= 0.90"),
             ("lrtrain GaLoreAdamW", "torch AdamW (foreach)", "steady_ms", "<= 1.25"),
             ("lrtrain FiraAdamW", "fira FiraAdamW", "amortised_ms", None),
             ("lrtrain FiraAdamW", "fira FiraAdamW", "steady_ms", None)]
    for ours, ref, key, target in pairs:
        if ours in by and ref in by:
            value = by[ours][key] / by[ref][key]
            goal = f" (target {target})" if target else ""
            out.append(f"{key.replace('_ms', '')} {ours} / {ref}: {value:.2f}{goal}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SIZES), default="llama_60m")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap used for the amortised step")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steady-steps", type=int, default=3, help="steady steps timed per round (median)")
    parser.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS, choices=DEFAULT_OPTIMIZERS)
    args = parser.parse_args()
    shapes = linear_shapes(args.model)
    print(f"{args.model} linear shapes ({len(shapes)} matrices, {sum(m * n for m, n in shapes) / 1e6:.1f}M weights), "
          f"rank {args.rank}, gap {args.gap}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"medians of {args.rounds} interleaved rounds")
    rows = run(args.model, args.rank, args.gap, args.rounds, args.steady_steps, args.optimizers)
    print(markdown(rows))
    print()
    for line in ratios(rows):
        print(line)


if __name__ == "__main__":
    main()
