"""Train one small causal transformer with AdamW, GaLore, Fira and FRUGAL; print loss and
optimizer-state bytes side by side.

The data is a synthetic language: sequences from a fixed random second-order Markov chain whose
next token takes one of two values, so a model can learn it and the achievable loss (the chain's
entropy, ln 2) is known. Everything is seeded; it runs on a CPU in about half a minute.

    python examples/compare_optimizers.py [--steps 300]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from lrtrain.memory import format_bytes, state_bytes
from lrtrain.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW, describe, param_groups


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(dim, 3 * dim, bias=False), "out": nn.Linear(dim, dim, bias=False)})
        self.mlp = nn.ModuleDict({"up": nn.Linear(dim, ffn, bias=False), "down": nn.Linear(ffn, dim, bias=False)})

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.attn["qkv"](self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.attn["out"](y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp["down"](F.gelu(self.mlp["up"](self.mlp_norm(x))))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int, dim: int = 128, heads: int = 4, ffn: int = 344, layers: int = 2, seq: int = 64):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.layers = nn.ModuleList(Block(dim, heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed_tokens(tokens) + self.pos[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class MarkovLanguage:
    """Tokens from a random order-2 Markov chain: each pair of tokens has ``branching`` equally
    likely successors, so the best achievable loss is ln(branching) (once the first two tokens are
    seen) and learning it needs attention to the two previous tokens."""

    def __init__(self, vocab: int = 16, branching: int = 2, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.successors = torch.randint(0, vocab, (vocab, vocab, branching), generator=gen)
        self.entropy = math.log(branching)

    def batch(self, size: int, length: int, generator: torch.Generator) -> torch.Tensor:
        tokens = torch.randint(0, self.vocab, (size, 2), generator=generator)
        for _ in range(length - 2):
            choice = torch.randint(0, self.successors.shape[-1], (size,), generator=generator)
            nxt = self.successors[tokens[:, -2], tokens[:, -1], choice]
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        return tokens


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


METHODS = {
    # name: (optimizer class, lr, group keys) — the references' recipes scaled to a tiny model
    "AdamW": (torch.optim.AdamW, 3e-3, None),
    "GaLore": (GaLoreAdamW, 1e-2, {"rank": 32, "update_proj_gap": 50, "scale": 0.25}),
    "Fira": (FiraAdamW, 1e-2, {"rank": 32, "update_proj_gap": 50, "scale": 0.25}),
    "FRUGAL (svd)": (FrugalAdamW, 3e-3, {"rank": 32, "update_proj_gap": 50}),
    "FRUGAL (blocks)": (FrugalAdamW, 3e-3, {"rank": None, "density": 0.25, "proj_method": "blocks",
                                           "block_order": "descending", "update_proj_gap": 50}),
}


def train(name: str, steps: int, batch: int, seq: int, show_table: bool) -> dict:
    torch.manual_seed(0)
    data = MarkovLanguage(seed=0)
    model = TinyTransformer(data.vocab, seq=seq)
    cls, lr, keys = METHODS[name]
    if keys is None:
        opt = cls(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        opt = cls(param_groups(model, target_modules=["attn", "mlp"], **keys), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (steps // 10)))
    train_sampler, eval_batch = torch.Generator().manual_seed(1), data.batch(64, seq, torch.Generator().manual_seed(2))
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, data.batch(batch, seq, train_sampler))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
    with torch.no_grad():
        eval_loss = lm_loss(model, eval_batch).item()
    if show_table:
        print(describe(opt), end="\n\n")
    return {"method": name, "train_loss": sum(losses[-20:]) / 20, "eval_loss": eval_loss,
            "entropy": data.entropy, "seconds": time.perf_counter() - start, **state_bytes(opt)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--describe", action="store_true", help="print describe(optimizer) for each method")
    args = parser.parse_args()
    rows = [train(name, args.steps, args.batch, args.seq, args.describe) for name in METHODS]
    print(f"{args.steps} steps, batch {args.batch} x {args.seq} tokens; the chain's entropy (best loss) is "
          f"{rows[0]['entropy']:.3f}\n")
    print("| method | train loss (last 20) | eval loss | optimizer state | moments | basis | time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['train_loss']:.3f} | {r['eval_loss']:.3f} | {format_bytes(r['total'])} | "
              f"{format_bytes(r['moments'])} | {format_bytes(r['basis'])} | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
