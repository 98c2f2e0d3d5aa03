"""Run under ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU): every subspace optimizer and
mode on parameters split over the ranks (DTensors, as FSDP2 makes them) against the same optimizer
on whole tensors in one process, in float64. Exits non-zero on the first mismatch.

Shapes cover each layout: a right projection of a dim-0 split (local; uneven shards), a left
projection of a dim-1 split (local, through the transpose), the two crossed cases (an all-reduce of
the projected gradient each step), and a split bias in the plain AdamW group.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from lrtrain.distributed import COMM
from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdafactor, GaLoreAdamW

F64 = torch.float64
MATRICES = [((37, 11), 0), ((12, 29), 1), ((12, 29), 0), ((30, 14), 1)]  # (shape, split dim)
CASES = {
    "galore-svd": (GaLoreAdamW, {}),
    "galore-randomized": (GaLoreAdamW, {"proj_method": "randomized", "power_iters": 1}),
    "fira-svd": (FiraAdamW, {}),
    "fira-random": (FiraAdamW, {"proj_method": "random"}),
    "frugal-svd-sign": (FrugalAdamW, {}),
    "frugal-coordinates": (FrugalAdamW, {"proj_method": "coordinates"}),
    "frugal-sgd-randomized": (FrugalAdamW, {"proj_method": "randomized", "residual": "sgd"}),
    "galore-svd-project": (GaLoreAdamW, {"refresh_moments": "project"}),
    "frugal-coordinates-project": (FrugalAdamW, {"proj_method": "coordinates", "refresh_moments": "project"}),
    "frugal-blocks": (FrugalAdamW, {"rank": None, "density": 0.5, "proj_method": "blocks", "block_order": "random"}),
    "galore-int8-basis-float32-moments": (GaLoreAdamW, {"basis_dtype": "int8", "moment_dtype": "float32"}),
    "fira-int4-basis-project": (FiraAdamW, {"proj_method": "random", "basis_dtype": "int4", "refresh_moments": "project"}),
}


def build(cls, keys, tensors, splits, mesh):
    def wrap(t, dim):
        return torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(dim)]) if mesh is not None else t.clone())

    matrices = [wrap(t, d) for t, d in zip(tensors[:-1], splits)]
    bias = wrap(tensors[-1], 0)
    groups = [{"params": [bias]}, {"params": matrices, "rank": 4, "update_proj_gap": 3, **keys}]
    return [*matrices, bias], cls(groups, lr=2e-2, weight_decay=0.05)


def check(name, a, b, tol=1e-9):
    a = a.full_tensor() if isinstance(a, DTensor) else a
    b = b.full_tensor() if isinstance(b, DTensor) else b
    if not torch.allclose(a, b, rtol=tol, atol=tol):
        raise AssertionError(f"{name}: max |diff| {(a - b).abs().max().item():.3e}")


def run_case(label, cls, keys, mesh, rank):
    torch.manual_seed(0)
    shapes = [s for s, _ in MATRICES] + [(8,)]
    tensors = [torch.randn(s, dtype=F64) for s in shapes]
    sharded, opt = build(cls, keys, tensors, [d for _, d in MATRICES], mesh)
    whole, ref = build(cls, keys, tensors, [d for _, d in MATRICES], None)
    for step in range(10):
        grads = [torch.randn(s, dtype=F64) for s in shapes]
        if step == 6:  # a NaN on one rank's rows at a refresh: every rank must skip it alike
            grads[0][30, 3] = float("nan")
        for p, q, g in zip(sharded, whole, grads):
            p.grad = distribute_tensor(g.clone(), p.device_mesh, p.placements)
            q.grad = g.clone()
        with torch.no_grad():
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step()
                ref.step()
    for i, (p, q) in enumerate(zip(sharded, whole)):
        check(f"{label} param {i} {tuple(q.shape)}", p, q)
        for key, value in ref.state[q].items():
            check(f"{label} param {i} state {key}", opt.state[p][key], value)
    if rank == 0:
        print(f"ok {label}")


def steady_steps_communicate_nothing(mesh):
    """Aligned layouts (right on dim 0, left on dim 1) project locally: no collective between refreshes."""
    torch.manual_seed(1)
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(s, dtype=F64), mesh, [Shard(d)]))
              for s, d in MATRICES[:2]]
    for cls in (GaLoreAdamW, FiraAdamW, FrugalAdamW):
        opt = cls([{"params": params, "rank": 4, "update_proj_gap": 1000}], lr=1e-2)
        for step in range(3):
            for p in params:
                p.grad = distribute_tensor(torch.randn(p.shape, dtype=F64), mesh, p.placements)
            COMM.reset()
            opt.step()
            expected = {"all_reduce": 8 * len(params)} if cls is FiraAdamW else {}  # Fira: ‖S‖² (one float64)
            if step > 0 and dict(COMM.bytes) != expected:
                raise AssertionError(f"{cls.__name__}: steady step communicated {dict(COMM.bytes)}, not {expected}")
    if dist.get_rank() == 0:
        print("ok steady steps")


def split_parameters_are_refused_where_unsupported(mesh):
    """8-bit state and Adafactor's factored statistics refuse sharded parameters when the optimizer is built."""
    p = torch.nn.Parameter(distribute_tensor(torch.randn(16, 8), mesh, [Shard(0)]))
    for make, message in ((lambda: GaLoreAdamW([p], state_bits=8), "state_bits=8 with sharded (FSDP2) parameters"),
                          (lambda: GaLoreAdafactor([p]), "inner='adafactor' (GaLoreAdafactor) with sharded")):
        try:
            make()
        except ValueError as err:
            assert message in str(err), err
        else:
            raise AssertionError(f"a split parameter was accepted where {message!r} should refuse it")
    if dist.get_rank() == 0:
        print("ok 8-bit refuses split parameters")
        print("ok Adafactor refuses split parameters")


def main():
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    selected = sys.argv[1:] or list(CASES)
    for label in selected:
        run_case(label, *CASES[label], mesh, dist.get_rank())
    steady_steps_communicate_nothing(mesh)
    split_parameters_are_refused_where_unsupported(mesh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
