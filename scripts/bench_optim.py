"""Optimizer step time on LLaMA linear shapes, lrtrain against the reference packages, side by side.

For each optimizer two instances are timed on the same gradients: one that refreshes its subspace
on every step (``update_proj_gap=1``: the refresh step) and one that never refreshes after its
first step (the steady step). Rounds interleave the optimizers, and each figure is a median over
rounds, so a noisy shared machine slows all of them alike. The amortised step is
``(refresh + (gap - 1) · steady) / gap``. Ratios are printed from this one run; ``--plot`` draws
the amortised steps (steady part and refresh share) as a bar chart.

    python scripts/bench_optim.py                      # LLaMA-60M shapes, rank 128, gap 200
    python scripts/bench_optim.py --model llama_60m llama_350m --rank 128 --layers 4 --plot chart.png
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from lrtrain.memory import format_bytes, state_bytes
from lrtrain.models import LLAMA_SIZES, linear_shapes
from lrtrain.optim import ApolloAdamW, FiraAdamW, FrugalAdamW, GaLoreAdafactor, GaLoreAdamW


def _reference_classes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import apollo_torch
        import bitsandbytes
        import fira
        import galore_torch
    return (galore_torch.GaLoreAdamW, galore_torch.GaLoreAdafactor, fira.FiraAdamW, apollo_torch.APOLLOAdamW,
            bitsandbytes.optim.AdamW8bit)


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
    galore_ref, galore_adafactor_ref, fira_ref, apollo_ref, adamw8bit = _reference_classes()
    if name == "GEMM floor (2 fp32 matmuls/matrix)":
        return GemmFloor(params, rank)
    if name == "torch AdamW (foreach)":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True)
    if name == "bitsandbytes AdamW8bit":
        return adamw8bit(params, lr=1e-3, weight_decay=0.0)
    if name == "galore-torch GaLoreAdamW":
        return galore_ref([{"params": params, **lowrank, "scale": 0.25}], lr=1e-3, no_deprecation_warning=True)
    if name == "galore-torch GaLoreAdafactor":
        return galore_adafactor_ref([{"params": params, **lowrank, "scale": 0.25}])
    if name == "fira FiraAdamW":
        return fira_ref([{"params": params, **lowrank, "alpha": 0.25}], lr=1e-3, no_deprecation_warning=True)
    if name == "apollo-torch APOLLOAdamW":
        return apollo_ref([{"params": params, **lowrank, "proj": "random", "scale_type": "channel", "scale": 1.0}],
                          lr=1e-3)
    cls_name, _, method = name.removeprefix("lrtrain ").partition(" ")
    options = {"proj_method": method.strip("()")} if method else {}
    if cls_name == "GaLoreAdafactor":
        return GaLoreAdafactor([{"params": params, **lowrank, **options}])
    cls = {"GaLoreAdamW": GaLoreAdamW, "FiraAdamW": FiraAdamW, "FrugalAdamW": FrugalAdamW, "ApolloAdamW": ApolloAdamW}
    return cls[cls_name]([{"params": params, **lowrank, **options}], lr=1e-3, weight_decay=0.0)


DEFAULT_OPTIMIZERS = [
    "GEMM floor (2 fp32 matmuls/matrix)",
    "torch AdamW (foreach)",
    "bitsandbytes AdamW8bit",
    "galore-torch GaLoreAdamW",
    "lrtrain GaLoreAdamW (svd)",
    "lrtrain GaLoreAdamW (randomized)",
    "fira FiraAdamW",
    "lrtrain FiraAdamW (svd)",
    "lrtrain FiraAdamW (randomized)",
    "lrtrain FrugalAdamW (svd)",
    "lrtrain FrugalAdamW (randomized)",
    "apollo-torch APOLLOAdamW",
    "lrtrain ApolloAdamW",
    "galore-torch GaLoreAdafactor",
    "lrtrain GaLoreAdafactor",
]
#: Optimizers whose state holds Python objects (a projector), which ``state_bytes`` cannot count.
OBJECT_STATE = ("galore-torch", "fira", "apollo-torch")


def _refreshes(name: str) -> bool:
    return name.startswith(("lrtrain", "galore", "fira", "apollo"))


def _timed_step(opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def run(model: str, rank: int, gap: int, rounds: int, steady_steps: int, names: list[str],
        layers: int | None = None) -> list[dict]:
    torch.manual_seed(0)
    shapes = linear_shapes(model, layers)
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
            "state": None if name.startswith(OBJECT_STATE) else state_bytes(steady[name])["total"],
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
    galore, randomized = "lrtrain GaLoreAdamW (svd)", "lrtrain GaLoreAdamW (randomized)"
    pairs = [("GEMM floor (2 fp32 matmuls/matrix)", "torch AdamW (foreach)", "steady_ms", None),
             (randomized, galore, "refresh_ms", "<= 0.20"),
             (randomized, "galore-torch GaLoreAdamW", "amortised_ms", "<= 0.75"),
             (galore, "galore-torch GaLoreAdamW", "amortised_ms", "<= 1.00"),
             (galore, "galore-torch GaLoreAdamW", "steady_ms", "<= 0.90"),
             (galore, "torch AdamW (foreach)", "steady_ms", "<= 1.25"),
             ("lrtrain FiraAdamW (svd)", "fira FiraAdamW", "amortised_ms", None),
             ("lrtrain FiraAdamW (svd)", "fira FiraAdamW", "steady_ms", None),
             ("lrtrain ApolloAdamW", "apollo-torch APOLLOAdamW", "amortised_ms", None),
             ("lrtrain GaLoreAdafactor", "galore-torch GaLoreAdafactor", "amortised_ms", None)]
    for ours, ref, key, target in pairs:
        if ours in by and ref in by:
            value = by[ours][key] / by[ref][key]
            goal = f" (target {target})" if target else ""
            out.append(f"{key.replace('_ms', '')} {ours} / {ref}: {value:.2f}{goal}")
    return out


def plot(results: dict[str, list[dict]], path: str, gap: int) -> None:
    """One horizontal bar chart per model: the amortised step, split into the steady part and the
    refresh's share ``(refresh - steady) / gap``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 0.45 * len(DEFAULT_OPTIMIZERS) + 1.5),
                             squeeze=False)
    for ax, (model, rows) in zip(axes[0], results.items()):
        names = [row["optimizer"] for row in rows][::-1]
        steady = [row["steady_ms"] for row in rows][::-1]
        refresh = [row["amortised_ms"] - row["steady_ms"] for row in rows][::-1]
        ax.barh(names, steady, label="steady step")
        ax.barh(names, refresh, left=steady, label=f"refresh share (1/{gap} of the refresh step)")
        ax.set_xlabel("amortised optimizer step (ms)")
        ax.set_title(f"{model} linear shapes")
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", choices=list(LLAMA_SIZES), default=["llama_60m"])
    parser.add_argument("--layers", type=int, default=None, help="time the first N layers' shapes only")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap used for the amortised step")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steady-steps", type=int, default=3, help="steady steps timed per round (median)")
    parser.add_argument("--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS, choices=DEFAULT_OPTIMIZERS)
    parser.add_argument("--plot", help="write a PNG bar chart of the amortised steps here")
    args = parser.parse_args()
    results = {}
    for model in args.model:
        shapes = linear_shapes(model, args.layers)
        layers = f", first {args.layers} layers" if args.layers else ""
        print(f"\n{model} linear shapes{layers} ({len(shapes)} matrices, {sum(m * n for m, n in shapes) / 1e6:.1f}M "
              f"weights), rank {args.rank}, gap {args.gap}, fp32, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds\n")
        results[model] = run(model, args.rank, args.gap, args.rounds, args.steady_steps, args.optimizers, args.layers)
        print(markdown(results[model]))
        print()
        for line in ratios(results[model]):
            print(line)
    if args.plot:
        plot(results, args.plot, args.gap)


if __name__ == "__main__":
    main()
