"""The subspace refresh: exact SVD against lrtrain's randomized refresh, time and captured energy.

Gradients are real: one backward pass of a randomly initialised LLaMA (default llama_350m, whose
MLP matrices are 2736x1024 and 1024x2736) on random tokens, then a second batch for the warm start
(the randomized refresh starts from the basis of the previous refresh, here the first batch's
exact one). For each weight shape and rank: the median time of ``svd_basis`` and of
``randomized_basis`` (cold: Gaussian start; warm), interleaved over ``--rounds``, and the captured
gradient energy ‖down(G)‖² / ‖G‖² of each basis relative to the exact SVD's.

    python scripts/bench_refresh.py [--model llama_350m --ranks 128 256 --power-iters 1 2 --seq 1024 --rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lrtrain.models.llama import LlamaForCausalLM, llama_config
from lrtrain.optim.projector import project, projection_side, randomized_basis, svd_basis


def layer_gradients(model_size: str, seq: int, seed: int) -> dict[tuple[int, int], torch.Tensor]:
    """Float32 gradients of layer 0's attention and MLP weights (one per distinct shape) for one batch."""
    torch.manual_seed(0)  # the same weights for every batch
    model = LlamaForCausalLM(llama_config(model_size, 32000))
    tokens = torch.randint(0, 32000, (1, seq + 1), generator=torch.Generator().manual_seed(seed))
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    layer = model.model.layers[0]
    weights = [layer.self_attn.q_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight]
    return {tuple(w.shape): w.grad.detach().clone() for w in weights}


def right_view(grad: torch.Tensor) -> torch.Tensor:
    """G or Gᵀ, so that the basis GaLore's ``std`` rule picks is a right basis of the view."""
    return grad if projection_side(tuple(grad.shape), "std") == "right" else grad.T


def energy(grad: torch.Tensor, basis: torch.Tensor) -> float:
    return float(project(grad, basis, "right").square().sum() / grad.square().sum())


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_350m")
    parser.add_argument("--ranks", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--power-iters", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--oversample", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024, help="tokens per gradient (its rank is at most this)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    first, second = layer_gradients(args.model, args.seq, 1), layer_gradients(args.model, args.seq, 2)
    print(f"{args.model} layer-0 gradients (1 x {args.seq} random tokens), fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds\n")
    print("| shape | rank | refresh | time (ms) | speed-up over SVD | energy / SVD's |")
    print("|---|---:|---|---:|---:|---:|")
    for shape, grad in second.items():
        view = right_view(grad)
        for rank in args.ranks:
            previous = svd_basis(right_view(first[shape]), rank, "right")
            runs = {"svd": lambda view=view, rank=rank: svd_basis(view, rank, "right")}
            for iters in args.power_iters:
                for start, prev in (("cold", None), ("warm", previous)):
                    runs[f"randomized, {start}, {iters} power iter."] = (
                        lambda prev=prev, iters=iters, view=view, rank=rank: randomized_basis(
                            view, rank, previous=prev, seed=0, oversample=args.oversample, power_iters=iters))
            times = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, fn in runs.items():
                    times[name].append(seconds(fn))
            exact = energy(view, runs["svd"]())
            svd_time = statistics.median(times["svd"])
            for name, fn in runs.items():
                t = statistics.median(times[name])
                print(f"| {shape[0]}x{shape[1]} | {rank} | {name} | {1e3 * t:.1f} | {svd_time / t:.1f} | "
                      f"{energy(view, fn()) / exact:.3f} |", flush=True)


if __name__ == "__main__":
    main()
