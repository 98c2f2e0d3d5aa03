"""lrtrain's optimizers in your own training loop: the two lines that change are marked.

Trains a tiny LLaMA on the embedded Shakespeare corpus for a few steps with each optimizer and
prints loss and optimizer-state bytes:

    python examples/custom_loop.py [--steps 100]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from lrtrain.data import load_data
from lrtrain.memory import format_bytes, state_bytes
from lrtrain.models import build_model
from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW, describe, param_groups


def make_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=3e-3)
    cls = {"galore": GaLoreAdamW, "fira": FiraAdamW, "frugal": FrugalAdamW}[name]
    groups = param_groups(model, target_modules=["attn", "mlp"], rank=32, update_proj_gap=50)  # <- 1
    return cls(groups, lr=0.01 if name != "frugal" else 3e-3)  # <- 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    cache = os.environ.get("LRTRAIN_CACHE_DIR", os.path.expanduser("~/.cache/lrtrain"))
    data = load_data("shakespeare", seq_len=128, cache_dir=cache)
    for name in ("adamw", "galore", "fira", "frugal"):
        torch.manual_seed(0)
        data.train.load_state_dict({"epoch": 0, "position": 0})  # the same batches for every optimizer
        model = build_model("llama_tiny", vocab_size=data.vocab_size, max_position_embeddings=128)
        opt = make_optimizer(name, model)
        for _ in range(args.steps):
            tokens = data.train.next_batch(16)
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        print(f"{name:7s} loss {loss.item():.3f}  optimizer state {format_bytes(state_bytes(opt)['total'])}")
        if name == "galore":
            print(describe(opt))


if __name__ == "__main__":
    main()
