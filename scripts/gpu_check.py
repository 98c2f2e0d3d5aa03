"""One script that checks lrtrain's GPU path on a CUDA machine, in about 8 minutes on an H100/H200, and prints
one markdown table last. It needs torch and triton; galore-torch is timed when it is installed.

    python scripts/gpu_check.py                      # on a GPU: every section below
    python scripts/gpu_check.py --compile-only       # anywhere: compile every kernel variant for sm_90
    TRITON_INTERPRET=1 python scripts/gpu_check.py --smoke   # on a CPU: every section at toy sizes

Sections (GPU):
1. ceilings measured here: copy bandwidth, bf16 tensor-core and float32 FMA matmul throughput;
2. the kernels against float64 math: odd shapes, both sides, every precision and residual rule, fresh
   non-zero inputs, outputs poisoned with NaN beforehand, each run twice and compared bit for bit;
3. the fused optimizer step against the torch path end to end: GaLore, Fira and FRUGAL on bf16 weights,
   layer-wise updates beside 8-bit plain groups, and a step on a side stream;
4. timings of one steady step on LLaMA-1B/7B shapes at ranks 128-1024: lrtrain fused, lrtrain's torch path,
   galore-torch, torch AdamW (fused and foreach), each stepping a layer's matrices of one shape together,
   CUDA events over rotating gradients, medians, with the products' TFLOP/s against the bf16 ceiling;
5. 20 harness steps of llama_60m in bf16: peak memory against ``lrtrain.memory.estimate``, and what the
   process holds beyond its tensors (the constant fitted to GaLore's Table 11 in the README).
``--compile-only`` prints one JSON line per variant: ``{"kernel", "variant", "arch", "regs", "spill_bytes",
"tensor_core", "default"}``, and exits non-zero if a variant spills or a default variant has no tensor-core
instruction.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RULES = ("galore", "fira", "frugal")


def compile_only(arch: int, defaults_only: bool, first_tile: bool) -> int:
    """Section 0: AOT compile report (no GPU needed). Returns the exit status."""
    from lrtrain.kernels.compile_report import compile_report

    failures = 0
    for row in compile_report(arch=arch, only_default=defaults_only, first_tile=first_tile):
        print(json.dumps(row), flush=True)
        failures += row["spill_bytes"] > 0 or (row["default"] and not row["tensor_core"])
    return 1 if failures else 0


def timer(device: torch.device):
    """``run(fn)`` → seconds of one call (CUDA events on a GPU)."""
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


def ceilings(device: torch.device, size: int, rounds: int) -> dict[str, float]:
    """Section 1: copy bytes/s, bf16 and float32 (no TF32) matmul FLOP/s, measured here."""
    timed = timer(device)
    src = torch.empty(size * size * 4, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    out = {"copy_bytes_per_s": 2 * src.numel() / statistics.median(timed(lambda: dst.copy_(src))
                                                                  for _ in range(rounds))}
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for name, dtype in (("bf16_flops", torch.bfloat16), ("fp32_flops", torch.float32)):
            a, b = torch.randn(size, size, device=device).to(dtype), torch.randn(size, size, device=device).to(dtype)
            seconds = statistics.median(timed(lambda a=a, b=b: a @ b) for _ in range(rounds))
            out[name] = 2 * size**3 / seconds
    finally:
        torch.set_float32_matmul_precision(previous)
    return out


def kernels_against_float64(device: torch.device, shapes: list[tuple[int, int, int]], precisions: tuple[str, ...],
                            dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """Section 2: every given precision and weight dtype, both sides, every rule; returns the failures."""
    from lrtrain.kernels.subspace_adam import RESIDUAL_CODES, product_error_bound, project_adam, project_back_update_
    from lrtrain.optim.subspace import roundoff_floor

    failures = []
    for (m, n, r), side, precision, dtype in ((s, side, p, d) for s in shapes for side in ("right", "left")
                                              for p in precisions for d in dtypes):
        grad = torch.randn(m, n, device=device).to(dtype)
        q = torch.linalg.qr(torch.randn(n if side == "right" else m, r, device=device, dtype=torch.float64))[0]
        basis64 = q.T.contiguous() if side == "right" else q.contiguous()
        basis = basis64.float()
        down = (lambda x, q=basis64: x @ q.T) if side == "right" else (lambda x, q=basis64: q.T @ x)
        back = (lambda x, q=basis64: x @ q) if side == "right" else (lambda x, q=basis64: q @ x)
        bound = product_error_bound(*((grad.double().abs(), basis64.abs().T) if side == "right" else
                                      (basis64.abs().T, grad.double().abs())), precision)
        results = []
        for _ in range(2):  # twice: the same bits
            exp_avg = torch.full((m, r) if side == "right" else (r, n), 0.5, device=device)
            exp_avg_sq = torch.full_like(exp_avg, 0.25)
            _, low = project_adam(grad, basis, side, exp_avg, exp_avg_sq, beta1=0.9, beta2=0.99, eps=1e-8,
                                  return_low=True, precision=precision)
            results.append((low, exp_avg))
        label = f"project_adam {m}x{n} r{r} {side} {precision} {dtype}"
        if not torch.equal(results[0][0], results[1][0]):
            failures.append(label + ": not deterministic")
        if not ((results[0][0].double() - down(grad.double())).abs() <= bound + 1e-30).all():
            failures.append(label + ": R outside the precision's bound")
        for residual in RESIDUAL_CODES:
            direction = down(torch.randn(m, n, device=device, dtype=torch.float64)).float()
            low = down(grad.double()).float()
            coef = (roundoff_floor(grad.float(), side).flatten() if residual == "sign_sgd" else
                    torch.rand(m if side == "right" else n, device=device))
            weight0 = torch.randn(m, n, device=device).to(dtype)
            outs = []
            for _ in range(2):
                padded = torch.full((m + 3, n + 5), float("nan"), device=device, dtype=dtype)  # poisoned margins
                weight = padded[1:m + 1, 2:n + 2]
                weight.copy_(weight0)
                project_back_update_(weight, direction, basis, side, keep=0.99, alpha=0.1, residual=residual,
                                     gamma=0.05, grad=grad, coef=coef, low=low, precision=precision)
                outs.append(padded)
            label = f"project_back_update {m}x{n} r{r} {side} {precision} {dtype} {residual}"
            margin = outs[0].clone()
            margin[1:m + 1, 2:n + 2] = float("nan")
            if not torch.equal(outs[0].nan_to_num(7.0), outs[1].nan_to_num(7.0)):
                failures.append(label + ": not deterministic")
            if not margin.isnan().all():
                failures.append(label + ": wrote outside the matrix")
            got = outs[0][1:m + 1, 2:n + 2].double()
            want = 0.99 * weight0.double() - 0.1 * back(direction.double())
            g = grad.double()
            if residual == "fira":
                want -= 0.05 * (coef[:, None] if side == "right" else coef[None, :]).double() * g
            elif residual == "sgd":
                want -= 0.05 * (g - back(low.double()))
            if residual != "sign_sgd":  # sign-SGD's signs near its floor are checked on the CPU
                d, q = direction.double().abs(), basis64.abs()
                product = product_error_bound(*((d, q) if side == "right" else (q, d)), precision)
                if residual == "sgd":  # back(R), always in float32
                    r64 = low.double().abs()
                    product = product + product_error_bound(*((r64, q) if side == "right" else (q, r64)), "ieee")
                allowed = 0.1 * product + (2.0**-7 if dtype == torch.bfloat16 else 1e-6) * (want.abs() + 1)
                if not ((got - want).abs() <= allowed).all():
                    failures.append(label + ": outside the precision's bound")
    return failures


def fused_against_torch_path(device: torch.device, shape: tuple[int, int], steps: int) -> list[str]:
    """Section 3: whole optimizer steps, fused=True against fused=False (bf16 weights); returns failures."""
    from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW, LayerwiseUpdates, param_groups

    failures = []
    classes = {"galore": GaLoreAdamW, "fira": FiraAdamW, "frugal": FrugalAdamW}
    for rule, cls in classes.items():
        torch.manual_seed(0)
        w = torch.randn(*shape, device=device).to(torch.bfloat16)
        params = [torch.nn.Parameter(w.clone()) for _ in range(2)]
        opts = [cls([{"params": [p], "rank": 8, "update_proj_gap": 3}], lr=1e-2, weight_decay=0.1, fused=fused)
                for p, fused in zip(params, (False, True))]
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        for step in range(steps):
            grad = torch.randn(*shape, device=device).to(torch.bfloat16)
            for p, opt in zip(params, opts):
                p.grad = grad.clone()
                if stream is not None and step == steps - 1:  # the last step on a side stream
                    stream.wait_stream(torch.cuda.current_stream(device))
                    with torch.cuda.stream(stream):
                        opt.step()
                    torch.cuda.current_stream(device).wait_stream(stream)
                else:
                    opt.step()
            if not torch.allclose(params[1].float(), params[0].float(), rtol=2**-6, atol=2e-3):
                failures.append(f"fused {rule} step {step + 1} differs from the torch path")
            with torch.no_grad():
                params[1].copy_(params[0])
    # layer-wise updates on a small model, with 8-bit plain groups beside the fused matrices
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        models.append(torch.nn.Sequential(torch.nn.Embedding(64, 48), torch.nn.Linear(48, 96), torch.nn.GELU(),
                                          torch.nn.Linear(96, 64)).to(device, torch.bfloat16))
    drivers = []
    for model, fused in zip(models, (False, True)):
        groups = param_groups(model, target_modules=["1", "3"], rank=8, update_proj_gap=3)
        for group in groups:  # 8-bit moments for the plain tensors, on the torch path (the kernels take 32-bit)
            group.update({"state_bits": 8, "fused": False} if "rank" not in group else {"fused": fused})
        drivers.append(LayerwiseUpdates(GaLoreAdamW(groups, lr=1e-2), grad_accum=1))
    for _ in range(steps):
        tokens = torch.randint(0, 64, (4, 17), device=device)
        for model, driver in zip(models, drivers):
            with driver.micro_batch(0):
                logits = model(tokens[:, :-1]).float()
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for p, q in zip(*(model.parameters() for model in models)):
        if not torch.allclose(q.float(), p.float(), rtol=2**-5, atol=1e-2):
            failures.append("fused layer-wise updates (8-bit plain groups) differ from the torch path")
            break
    return failures


def _step_timer(make, grads, timed, rounds: int) -> float:
    """Median seconds of ``opt.step()`` over ``rounds`` rounds, rotating through ``grads`` (one list per round)."""
    params, opt = make()
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()  # state and the refresh, outside the timing
    seconds = []
    for i in range(rounds):
        for p, g in zip(params, grads[i % len(grads)]):
            p.grad = g
        seconds.append(timed(opt.step))
    return statistics.median(seconds)


def _lrtrain(weights, rank, fused):
    from lrtrain.optim import GaLoreAdamW

    params = [torch.nn.Parameter(w.clone()) for w in weights]
    group = {"params": params, "rank": rank, "update_proj_gap": 10**9, "proj_method": "random"}
    return params, GaLoreAdamW([group], lr=1e-3, fused=fused)


def _galore_torch(module, weights, rank):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    group = {"params": params, "rank": rank, "update_proj_gap": 10**9, "scale": 0.25, "proj_type": "std"}
    return params, module.GaLoreAdamW([group], lr=1e-3, no_deprecation_warning=True)


def _adamw(weights, style):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    return params, torch.optim.AdamW(params, lr=1e-3, **{style: True})


def timings(device: torch.device, cases: list[tuple[str, tuple[int, int], int, int]], rounds: int) -> list[dict]:
    """Section 4: steady-step medians per (model, shape, matrices of that shape in a layer, rank) for every
    optimizer, each stepping the layer's matrices of that shape together (lrtrain's fused step groups them)."""
    try:
        import galore_torch
    except ImportError:
        galore_torch = None
    timed, rows = timer(device), []
    for model, shape, count, rank in cases:
        grads = [[torch.randn(*shape, device=device).to(torch.bfloat16) for _ in range(count)] for _ in range(3)]
        weights = [torch.randn(*shape, device=device).to(torch.bfloat16) for _ in range(count)]
        makers = {"lrtrain fused": functools.partial(_lrtrain, weights, rank, True),
                  "lrtrain torch path": functools.partial(_lrtrain, weights, rank, False)}
        if galore_torch is not None:
            makers["galore-torch"] = functools.partial(_galore_torch, galore_torch, weights, rank)
        for style in ("fused", "foreach") if device.type == "cuda" else ("foreach",):
            makers[f"torch AdamW {style}"] = functools.partial(_adamw, weights, style)
        row = {"model": model, "shape": shape, "count": count, "rank": rank}
        for name, make in makers.items():
            row[name] = _step_timer(make, grads, timed, rounds)
        m, n = shape
        row["flops"] = count * 2 * 2 * m * n * rank  # the projection and the back-projection
        rows.append(row)
    return rows


def harness_memory(device: torch.device, model: str, steps: int, seq: int) -> dict:
    """Section 5: peak memory of ``steps`` harness steps (bf16, 8-bit GaLore, layer-wise off) against the estimator."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lrtrain.memory import estimate
    from lrtrain.train.loop import TrainSettings, causal_lm_loss
    from lrtrain.train.run import build_components

    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose("train", overrides=[f"model={model}", "method=galore", "sweep_name=gpu_check",
                                          "train.precision=bf16", f"train.seq_len={seq}", "train.batch_size=1"])
    config = OmegaConf.to_container(cfg, resolve=True)
    settings = TrainSettings.from_mapping(dict(config["train"]))
    built, optimizer, after_step, _ = build_components(config, 32000, settings, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        causal_lm_loss(built, torch.randint(0, 32000, (1, seq + 1), device=device)).backward()
        optimizer.step()
        for callback in after_step:
            callback()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    # what the process holds beyond its tensors: the CUDA context, kernels and the allocator's reserve (the
    # constant C that README "Memory against the papers" fits to GaLore's Table 11)
    overhead = float("nan")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        overhead = total - free - torch.cuda.memory_allocated(device)
    guess = estimate(model, method="galore", seq_len=seq, device=device.type)["peak"]
    return {"model": model, "steps": steps, "measured": peak, "estimate": guess, "overhead": overhead}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-only", action="store_true", help="AOT-compile every variant; no GPU needed")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --compile-only (90: H100/H200)")
    parser.add_argument("--defaults-only", action="store_true", help="--compile-only: the bf16 variants only")
    parser.add_argument("--first-tile", action="store_true", help="--compile-only: one autotuner tile per variant")
    parser.add_argument("--smoke", action="store_true", help="every GPU section at toy sizes on a CPU")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    if args.compile_only:
        return compile_only(args.arch, args.defaults_only, args.first_tile)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs the kernels under Triton's interpreter: set TRITON_INTERPRET=1")
        device, rounds = torch.device("cpu"), 2
        shapes, step_shape, cases, size = [(37, 29, 5)], (40, 24), [("smoke", (48, 40), 2, 8)], 64
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check.py needs a GPU (--compile-only and --smoke run without one)")
        device, rounds = torch.device("cuda"), args.rounds
        shapes, step_shape, size = [(517, 389, 61), (1000, 3001, 128), (2049, 777, 256)], (1000, 2736), 8192
        from lrtrain.models.llama import linear_shapes
        cases = []
        for model in ("llama_1b", "llama_7b"):
            layer = linear_shapes(model, layers=1)
            cases += [(model, shape, layer.count(shape), rank) for shape in dict.fromkeys(layer)
                      for rank in (128, 256, 512, 1024)]
    started = time.time()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    import triton
    print(f"{name}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    limits = ceilings(device, size, rounds)
    print("ceilings:", {k: f"{v:.3g}" for k, v in limits.items()}, flush=True)
    from lrtrain.kernels.subspace_adam import PRECISIONS

    precisions, dtypes = (("bf16",), (torch.bfloat16,)) if args.smoke else (PRECISIONS, (torch.float32, torch.bfloat16))
    failures = kernels_against_float64(device, shapes, precisions, dtypes)
    print(f"kernels against float64: {len(failures)} failures", *failures[:20], sep="\n", flush=True)
    end_to_end = fused_against_torch_path(device, step_shape, steps=2 if args.smoke else 5)
    print(f"fused against the torch path: {len(end_to_end)} failures", *end_to_end, sep="\n", flush=True)
    rows = timings(device, cases, rounds)
    memory = harness_memory(device, "llama_tiny" if args.smoke else "llama_60m", 2 if args.smoke else 20,
                            32 if args.smoke else 256)
    names = [key for key in rows[0] if key not in ("model", "shape", "count", "rank", "flops")]
    print(f"\n{name}, bf16 weights, one steady GaLore step of a layer's matrices of each shape (rank r, random "
          f"basis), medians of {rounds} rounds; {time.time() - started:.0f} s in all\n")
    print("| model | shape × matrices | rank | " + " | ".join(f"{n} (ms)" for n in names)
          + " | fused / galore-torch | fused TFLOP/s (% of bf16) | torch path / fused |")
    print("|---|---|---:|" + "---:|" * (len(names) + 3))
    for row in rows:
        fused = row["lrtrain fused"]
        versus = f"{fused / row['galore-torch']:.2f}" if "galore-torch" in row else "-"
        tflops = row["flops"] / fused
        print(f"| {row['model']} | {row['shape'][0]}x{row['shape'][1]} × {row['count']} | {row['rank']} | "
              + " | ".join(f"{1e3 * row[n]:.3f}" for n in names)
              + f" | {versus} | {tflops / 1e12:.1f} ({100 * tflops / limits['bf16_flops']:.0f} %) | "
              f"{row['lrtrain torch path'] / fused:.2f} |")
    print(f"\nharness: {memory['model']}, {memory['steps']} steps, peak {memory['measured'] / 1e9:.3f} GB measured, "
          f"{memory['estimate'] / 1e9:.3f} GB estimated; the process holds {memory['overhead'] / 1e9:.3f} GB more "
          "than its live tensors (context, kernels, allocator reserve; other processes on the GPU count too)")
    print(f"checks: {len(failures)} kernel failures, {len(end_to_end)} end-to-end failures")
    return 1 if failures or end_to_end else 0


if __name__ == "__main__":
    sys.exit(main())
