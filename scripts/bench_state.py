"""Optimizer state of real LLaMA layers in bf16, lrtrain's storages against galore-torch's, side by side.

One step of each optimizer on the same bf16 weights and gradients (the linear weights of ``--layers``
decoder layers of ``--model``, rank from the references' recipe for that size), then the bytes of its
state: moments, basis, other. galore-torch's basis is its projector's ``ortho_matrix``. Ratios are to
galore-torch's total from this one run. lrtrain's GaLore rows use ``proj_method="random"`` (no SVD on
a CPU): the state of an SVD basis takes the same bytes (``tests/optim/test_state_dtypes.py`` checks it
against galore-torch's SVD state). ``--time`` also times APOLLO's steady step with a stored and with a
seed-only basis (median of interleaved rounds); ``--energy MODEL`` measures the share of real gradients'
energy that an SVD basis captures when stored as float32, bf16, int8 or int4.

    python scripts/bench_state.py                          # LLaMA-1B, one layer, rank 512
    python scripts/bench_state.py --model llama_7b --layers 1 --time
    python scripts/bench_state.py --energy llama_20m
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
import warnings

import torch

from lrtrain.memory import RECIPE_RANK, state_bytes
from lrtrain.models import linear_shapes
from lrtrain.optim import ApolloAdamW, ApolloMiniAdamW, FiraAdamW, GaLoreAdamW
from lrtrain.text import format_table

MIB = 2**20

#: label -> (lrtrain class, group keys); GaLore's rows differ in storage only.
LRTRAIN = {
    "GaLore, float32 state": (GaLoreAdamW, {"moment_dtype": "float32", "basis_dtype": "float32"}),
    "GaLore (default: bf16 state)": (GaLoreAdamW, {}),
    "GaLore, int8 basis": (GaLoreAdamW, {"basis_dtype": "int8"}),
    "GaLore, int4 basis": (GaLoreAdamW, {"basis_dtype": "int4"}),
    "GaLore, 8-bit moments": (GaLoreAdamW, {"state_bits": 8}),
    "GaLore, 8-bit moments, int8 basis": (GaLoreAdamW, {"state_bits": 8, "basis_dtype": "int8"}),
    "GaLore, 8-bit moments, int4 basis": (GaLoreAdamW, {"state_bits": 8, "basis_dtype": "int4"}),
    "Fira": (FiraAdamW, {}),
    "APOLLO": (ApolloAdamW, {}),
    "APOLLO, seed-only basis": (ApolloAdamW, {"basis_dtype": "seed"}),
    "APOLLO-Mini, seed-only basis": (ApolloMiniAdamW, {"basis_dtype": "seed", "rank": 1}),
}


def _layers(model: str, layers: int, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in linear_shapes(model, layers):
        p = torch.nn.Parameter((0.02 * torch.randn(shape, generator=generator)).bfloat16())
        p.grad = torch.randn(shape, generator=generator).bfloat16()
        params.append(p)
    return params


def galore_torch_bytes(model: str, layers: int, rank: int) -> dict[str, int]:
    """One step of galore-torch's GaLoreAdamW; its state's bytes by category."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import galore_torch
    params = _layers(model, layers)
    opt = galore_torch.GaLoreAdamW([{"params": params, "rank": rank, "update_proj_gap": 200, "scale": 0.25,
                                     "proj_type": "std"}], lr=1e-2, no_deprecation_warning=True)
    opt.step()
    moments = sum(s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes for s in opt.state.values())
    basis = sum(s["projector"].ortho_matrix.nbytes for s in opt.state.values())
    return {"moments": moments, "basis": basis, "other": 0, "total": moments + basis}


def _lrtrain_optimizer(cls, keys: dict, params, rank: int) -> torch.optim.Optimizer:
    keys = {"rank": rank, "proj_method": "random" if cls is GaLoreAdamW else None, **keys}
    group = {"params": params, "update_proj_gap": 200, **{k: v for k, v in keys.items() if v is not None}}
    return cls([group], lr=1e-2)


def lrtrain_bytes(cls, keys: dict, model: str, layers: int, rank: int) -> dict[str, int]:
    params = _layers(model, layers)
    opt = _lrtrain_optimizer(cls, keys, params, rank)
    opt.step()
    return state_bytes(opt)


def rows(model: str, layers: int) -> list[dict]:
    rank = RECIPE_RANK[model]
    params = sum(a * b for a, b in linear_shapes(model, layers))
    out = [{"optimizer": "torch AdamW (bf16 moments)", "moments": 4 * params, "basis": 0, "other": 0,
            "total": 4 * params},
           {"optimizer": "galore-torch GaLoreAdamW", **galore_torch_bytes(model, layers, rank)}]
    for label, (cls, keys) in LRTRAIN.items():
        out.append({"optimizer": f"lrtrain {label}", **lrtrain_bytes(cls, keys, model, layers, rank)})
    return out


def steady_step_seconds(model: str, layers: int, rounds: int) -> dict[str, float]:
    """Median steady step (no refresh) of APOLLO with a stored and a seed-only basis, interleaved."""
    rank = RECIPE_RANK[model]
    instances = {}
    for storage in ("param", "seed"):
        params = _layers(model, layers)
        opt = _lrtrain_optimizer(ApolloAdamW, {"basis_dtype": storage}, params, rank)
        opt.step()  # the refresh
        instances[storage] = opt
    times = {storage: [] for storage in instances}
    for _ in range(rounds):
        for storage, opt in instances.items():
            start = time.perf_counter()
            opt.step()
            times[storage].append(time.perf_counter() - start)
    return {storage: statistics.median(t) for storage, t in times.items()}


def captured_energy(model: str, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """For each ``basis_dtype``, how well a decoder weight's rank-r SVD basis survives being stored and loaded
    back: the share of the gradient's energy ‖G‖² in the span of the loaded basis (mean and worst over the
    matrices), and the largest deviation of a loaded basis vector's norm from 1 (the update's scale error).
    Gradients of one next-token loss on random tokens of lrtrain's LLaMA ``model`` (float32), at its
    initialisation."""
    from lrtrain.models import build_model
    from lrtrain.optim.engine.storage import load_basis, store_basis_
    from lrtrain.optim.projector import project, projection_side, robust_svd_basis

    torch.manual_seed(seed)
    net = build_model(model, vocab_size=1000, max_position_embeddings=128)
    tokens = torch.randint(0, 1000, (4, 129))
    logits = net(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    kinds = ("float32", "bfloat16", "int8", "int4")
    rank, shares, norms = RECIPE_RANK[model], {kind: [] for kind in kinds}, {kind: [] for kind in kinds}
    for name, p in net.named_parameters():
        if p.dim() != 2 or "embed" in name or "lm_head" in name:
            continue
        side = projection_side(tuple(p.shape), "std")
        basis = robust_svd_basis(p.grad, min(rank, *p.shape), side, None, name)
        layout = types.SimpleNamespace(side=side, rank=basis.shape[0 if side == "right" else 1])
        for kind in shares:
            state: dict = {}
            store_basis_(state, basis, side, kind, torch.float32)
            loaded = load_basis(state, {"proj_method": "svd"}, layout, p, torch.float32)
            vectors = loaded if side == "left" else loaded.T  # (length, r): orthonormalise to measure the span
            span = torch.linalg.qr(vectors)[0]
            span = span if side == "left" else span.T
            shares[kind].append(float(project(p.grad, span, side).square().sum() / p.grad.square().sum()))
            norms[kind].append(float((torch.linalg.vector_norm(vectors, dim=0) - 1).abs().max()))
    return {kind: (statistics.mean(v), min(v), max(norms[kind])) for kind, v in shares.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_1b", choices=sorted(RECIPE_RANK))
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--time", action="store_true", help="time APOLLO's steady step, stored vs seed-only basis")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--energy", metavar="MODEL", help="the gradient energy an int8 / int4 basis captures "
                        "against a float one, on the decoder weights of this lrtrain LLaMA size (then exit)")
    args = parser.parse_args()
    if args.energy:
        print(f"{args.energy}, rank {RECIPE_RANK[args.energy]}: share of ‖G‖² in the loaded basis' span (mean, "
              "worst matrix), largest |‖vector‖ - 1|")
        for kind, (mean, worst, norm) in captured_energy(args.energy).items():
            print(f"  basis {kind:8s}  mean {mean:.6f}  worst {worst:.6f}  norm error {norm:.2e}")
        return
    results = rows(args.model, args.layers)
    reference = next(r for r in results if r["optimizer"].startswith("galore-torch"))["total"]
    table = [("optimizer", "moments MiB", "basis MiB", "other MiB", "total MiB", "/ galore-torch")]
    for r in results:
        table.append((r["optimizer"], *(f"{r[k] / MIB:.2f}" for k in ("moments", "basis", "other", "total")),
                      f"{r['total'] / reference:.3f}"))
    print(f"{args.model}, {args.layers} decoder layer(s), rank {RECIPE_RANK[args.model]}, bf16 weights, one step")
    print(format_table(table))
    if args.time:
        seconds = steady_step_seconds(args.model, args.layers, args.rounds)
        stored, seed = seconds["param"] * 1e3, seconds["seed"] * 1e3
        print(f"APOLLO steady step: stored basis {stored:.1f} ms, seed-only {seed:.1f} ms ({seed / stored:.2f}x)")


if __name__ == "__main__":
    main()
