"""Peak memory of LLaMA training steps by method, measured, with lrtrain's estimate beside it.

Each method is composed from the harness' configs (``method=...``), built on an lrtrain LLaMA with
the references' 32000-token vocabulary, and trained for two steps on random tokens (the first
refreshes the subspaces); the peak of live tensor bytes over both steps is measured op by op
(``lrtrain.memory.PeakMemory``: CUDA's allocator peak on a GPU, the tensor tracker on a CPU).

    python scripts/bench_memory.py --model llama_60m [--batch 1 --seq 64 256 --precision bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lrtrain.memory import PeakMemory, estimate
from lrtrain.train.loop import TrainSettings, causal_lm_loss
from lrtrain.train.run import build_components

METHODS = ["adamw", "adamw8bit", "galore", "galore8bit", "galore8bit_layerwise", "fira", "frugal", "apollo",
           "apollo_mini", "galore_adafactor", "sltrain", "sst"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def method_config(model: str, method: str, args, extra: tuple[str, ...] = ()) -> dict:
    overrides = [f"model={model}", f"method={method}", "sweep_name=bench", f"train.precision={args.precision}",
                 f"train.seq_len={args.seq}", f"train.batch_size={args.batch}", "train.grad_accum=1",
                 "train.grad_clip=0", *extra]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def measure(model_name: str, method: str, args, extra: tuple[str, ...] = ()) -> int:
    """Peak live tensor bytes over two training steps of ``method`` (the harness' components), with
    ``extra`` hydra overrides."""
    config = method_config(model_name, method, args, extra)
    settings = TrainSettings.from_mapping(dict(config["train"]))
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # the conversion summary
        model, optimizer, after_step, layerwise = build_components(config, args.vocab, settings, torch.device("cpu"))
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    peak_bytes = 0
    for _ in range(2):
        existing = [*model.parameters(), *model.buffers(), tokens,
                    *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))]
        with PeakMemory("cpu", existing) as peak:
            if layerwise is not None:
                with layerwise.micro_batch(0):
                    causal_lm_loss(model, tokens).backward()
            else:
                causal_lm_loss(model, tokens).backward()
                optimizer.step()
            for callback in after_step:
                callback()
            optimizer.zero_grad(set_to_none=True)
        peak_bytes = max(peak_bytes, peak.bytes)
    return peak_bytes


def estimated(model: str, method: str, args, **keys) -> int:
    """lrtrain.memory.estimate's peak for a bench method (``galore8bit_layerwise`` = galore, 8-bit, layer-wise),
    with estimate's ``keys``."""
    base = method.removesuffix("_layerwise").removesuffix("8bit") if method.startswith("galore") else method
    return estimate(model, method=base, vocab_size=args.vocab, dtype=args.precision, micro_batch=args.batch,
                    seq_len=args.seq, layerwise=method.endswith("_layerwise"), device="cpu",
                    state_bits=8 if base == "galore" and "8bit" in method else 32, **keys)["peak"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["llama_60m"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, nargs="+", default=[256])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    args = parser.parse_args()
    for model, args.seq in itertools.product(args.model, list(args.seq)):  # noqa: B020 (the list is copied first)
        print(f"\n{model}, vocab {args.vocab}, {args.batch} x {args.seq} tokens, {args.precision} weights, "
              f"CPU, torch {torch.__version__}: peak tensor bytes over two steps\n")
        print("| method | measured peak | estimate | estimate error | peak / AdamW's |")
        print("|---|---:|---:|---:|---:|")
        adamw = None
        for method in args.methods:
            measured = measure(model, method, args)
            guess = estimated(model, method, args)
            adamw = adamw or (measured if method == "adamw" else None)
            ratio = f"{measured / adamw:.2f}" if adamw else "-"
            print(f"| {method} | {measured / 2**20:.1f} MiB | {guess / 2**20:.1f} MiB | "
                  f"{100 * (guess / measured - 1):+.1f} % | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
