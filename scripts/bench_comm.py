"""What lrtrain's optimizers communicate per step under FSDP2, measured (torchrun).

The attention and MLP weights of a LLaMA size become DTensors split over the processes as the
harness splits them (dim 0; dim 1 for the matrices projected on the left, so that every projection
is local), gradients are set, and ``lrtrain.distributed.COMM`` counts the payload of every
collective an optimizer step issues: a steady step, and a refresh step.

    torchrun --standalone --nproc_per_node=2 scripts/bench_comm.py [--model llama_60m --rank 128]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lrtrain.distributed import COMM
from lrtrain.memory import format_bytes
from lrtrain.models import LLAMA_SIZES, linear_shapes
from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW
from lrtrain.optim.projector import projection_side

CASES = {  # label: (class, group keys, split left-projected matrices on dim 1)
    "GaLore, svd refresh": (GaLoreAdamW, {}, True),
    "GaLore, randomized refresh": (GaLoreAdamW, {"proj_method": "randomized"}, True),
    "GaLore, svd, left matrices split on dim 0": (GaLoreAdamW, {}, False),
    "Fira, svd refresh": (FiraAdamW, {}, True),
    "FRUGAL, blocks (density 0.25)": (FrugalAdamW, {"rank": None, "density": 0.25, "proj_method": "blocks"}, True),
}


def measure(cls, keys, dim1: bool, args, mesh) -> dict:
    torch.manual_seed(0)
    world = mesh.size()
    params = []
    for shape in linear_shapes(args.model):
        left = projection_side(shape, "std") == "left"
        dim = 1 if dim1 and left and shape[1] % world == 0 else 0
        params.append(torch.nn.Parameter(distribute_tensor(torch.randn(shape) * 0.02, mesh, [Shard(dim)])))
    group = {"params": params, "rank": args.rank, "update_proj_gap": 2, **keys}
    opt = cls([group], lr=1e-3)
    measured = {}
    for step in range(4):  # refreshes at steps 0 and 2; steps 1 and 3 are steady
        for p in params:
            p.grad = distribute_tensor(torch.randn(p.shape), mesh, p.placements)
        COMM.reset()
        start = time.perf_counter()
        opt.step()
        elapsed = time.perf_counter() - start
        if step >= 2:
            measured["refresh" if step == 2 else "steady"] = (COMM.total(), dict(COMM.bytes), elapsed)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(LLAMA_SIZES), default="llama_60m")
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rows = [(label, measure(cls, keys, dim1, args, mesh)) for label, (cls, keys, dim1) in CASES.items()]
    if dist.get_rank() == 0:
        n = len(linear_shapes(args.model))
        print(f"{args.model}: {n} attention/MLP matrices, rank {args.rank}, FSDP2-style split over "
              f"{dist.get_world_size()} processes (gloo, CPU); payload of the optimizer's collectives per rank\n")
        print("| optimizer | steady step | refresh step | refresh collectives |")
        print("|---|---:|---:|---|")
        for label, m in rows:
            kinds = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(m["refresh"][1].items())) or "-"
            print(f"| {label} | {format_bytes(m['steady'][0])} | {format_bytes(m['refresh'][0])} | {kinds} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
