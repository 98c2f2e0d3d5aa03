"""The fused Triton step against the engine's torch path, on a GPU, for LLaMA linear shapes.

For each weight shape of the chosen sizes, each rank and each rule (GaLore, Fira, FRUGAL), two
copies of one bf16 matrix step with ``fused=False`` and ``fused=True``, interleaved round by round
(steady steps: the subspace was refreshed once before timing); medians of ``--rounds`` rounds. The
update kernel is also timed alone, with its bytes (W read and written; G read where the rule
needs it) against the device's copy bandwidth measured in the same run.

    python scripts/bench_kernels.py [--models llama_1b llama_7b] [--ranks 128 256 512 1024] [--rounds 7]
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --smoke    # CPU check of the script itself
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lrtrain.models.llama import LLAMA_SIZES, linear_shapes
from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW
from lrtrain.optim.projector import projection_side

RULES = {"galore": GaLoreAdamW, "fira": FiraAdamW, "frugal": FrugalAdamW}


def shapes(model: str) -> list[tuple[int, int]]:
    """The distinct (out, in) weight shapes of a decoder layer: attention, gate/up, down."""
    return list(dict.fromkeys(linear_shapes(model, layers=1)))


def timer(device: torch.device):
    """A function that runs ``fn`` and returns its seconds (CUDA events on a GPU)."""
    def run(fn) -> float:
        if device.type != "cuda":
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    return run


def copy_bandwidth(device: torch.device, rounds: int) -> float:
    """Bytes per second of a large device-to-device copy (read + write), the floor's yardstick."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timed = timer(device)
    return 2 * src.numel() / statistics.median(timed(lambda: dst.copy_(src)) for _ in range(rounds))


def bench_step(rule: str, shape: tuple[int, int], rank: int, device: torch.device, rounds: int) -> dict[str, float]:
    """Median seconds of a steady step, torch path and fused, plus the update kernel alone."""
    from lrtrain.kernels.subspace_adam import project_back_update_

    weight = torch.randn(*shape, device=device).to(torch.bfloat16)
    params = [torch.nn.Parameter(weight.clone()) for _ in range(2)]
    grads = torch.randn(*shape, device=device).to(torch.bfloat16)
    opts = [RULES[rule]([{"params": [p], "rank": rank, "update_proj_gap": 10**9}], lr=1e-3, fused=fused)
            for p, fused in zip(params, (False, True))]
    for p, opt in zip(params, opts):  # the refresh, outside the timing
        p.grad = grads.clone()
        opt.step()
    timed = timer(device)
    times = {"torch": [], "fused": [], "update": []}
    state = opts[1].state[params[1]]
    basis = state["basis"]
    side = projection_side(shape, "std")
    direction = torch.zeros_like(state["exp_avg"])
    for _ in range(rounds):
        for name, opt in zip(("torch", "fused"), opts):
            times[name].append(timed(opt.step))
        times["update"].append(timed(lambda: project_back_update_(params[1], direction, basis, side, keep=1.0,
                                                                     alpha=0.0)))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama_1b", "llama_7b"], choices=list(LLAMA_SIZES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[128, 256, 512, 1024])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (needs TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.smoke:
        device, table = torch.device("cpu"), [("smoke", (48, 40), 8)]
        args.rounds, args.rules = 2, list(RULES)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_kernels.py times the kernels on a GPU: none is visible here "
                             "(TRITON_INTERPRET=1 ... --smoke checks the script on a CPU)")
        device = torch.device("cuda")
        table = [(model, shape, rank) for model in args.models for shape in shapes(model) for rank in args.ranks]
    bandwidth = copy_bandwidth(device, args.rounds)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}, torch {torch.__version__}, bf16 weights, steady steps, medians of {args.rounds} interleaved "
          f"rounds; copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    print("| model | shape | rank | rule | torch path (ms) | fused (ms) | speed-up | update kernel (ms) "
          "| update GB/s | % of copy bandwidth |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for model, shape, rank in table:
        for rule in args.rules:
            t = bench_step(rule, shape, rank, device, args.rounds)
            moved = 2 * 2 * shape[0] * shape[1]  # the update kernel alone: W (bf16) read and written
            print(f"| {model} | {shape[0]}x{shape[1]} | {rank} | {rule} | {1e3 * t['torch']:.3f} | "
                  f"{1e3 * t['fused']:.3f} | {t['torch'] / t['fused']:.2f} | {1e3 * t['update']:.3f} | "
                  f"{moved / t['update'] / 1e9:.0f} | {100 * moved / t['update'] / bandwidth:.0f} |", flush=True)


if __name__ == "__main__":
    main()
