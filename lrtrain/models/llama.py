"""A compact LLaMA for causal-LM pretraining: RMSNorm, rotary embeddings, SwiGLU, SDPA attention.

Parameter names are Hugging Face's ``LlamaForCausalLM`` names, so state dicts load into either model
and the optimizers' ``target_modules=["attn", "mlp"]`` selects the seven matrices of every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..checks import check_positive_int


@dataclass
class LlamaConfig:
    """Sizes and numerics of a LLaMA model (the fields of the GaLore benchmark configs)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_hidden_layers", "max_position_embeddings"):
            check_positive_int(f"LlamaConfig.{name}", getattr(self, name))
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LlamaConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LlamaConfig.hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; choose num_attention_heads among the divisors of hidden_size"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig head_dim = hidden_size / num_attention_heads = {self.head_dim} is odd; rotary "
                f"embeddings rotate pairs of channels, so pick sizes that give an even head_dim"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


#: (hidden, intermediate, heads, layers); the 60m..7b rows are GaLore's ``configs/llama_*.json``.
LLAMA_SIZES: dict[str, dict] = {
    name: dict(hidden_size=h, intermediate_size=f, num_attention_heads=a, num_hidden_layers=n)
    for name, (h, f, a, n) in {
        "llama_tiny": (128, 352, 4, 4),
        "llama_20m": (256, 688, 4, 4),
        "llama_60m": (512, 1376, 8, 8),
        "llama_130m": (768, 2048, 12, 12),
        "llama_350m": (1024, 2736, 16, 24),
        "llama_1b": (2048, 5461, 32, 24),
        "llama_7b": (4096, 11008, 32, 32),
    }.items()
}


def linear_shapes(size: str, layers: int | None = None) -> list[tuple[int, int]]:
    """(out, in) of the linear weights of the decoder layers of a named size — q, k, v, o, gate, up,
    down per layer — for the first ``layers`` layers (default all; every layer has the same shapes).
    The embeddings and the head are not included."""
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown LLaMA size {size!r}; known sizes: {', '.join(LLAMA_SIZES)}")
    fields = LLAMA_SIZES[size]
    h, f, count = fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"]
    return ([(h, h)] * 4 + [(f, h)] * 2 + [(h, f)]) * (count if layers is None else min(layers, count))


def llama_config(size: str, vocab_size: int, max_position_embeddings: int = 2048, **overrides) -> LlamaConfig:
    """The config of a named size (a key of ``LLAMA_SIZES``); ``overrides`` replace any field."""
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown LLaMA size {size!r}; known sizes: {', '.join(LLAMA_SIZES)}")
    fields = {**LLAMA_SIZES[size], "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings}
    return LlamaConfig(**{**fields, **overrides})


class RMSNorm(nn.Module):
    """``y = x * rsqrt(mean(x^2, -1) + eps) * weight``, normalised in float32 (or better) and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings, ``angle[p, i] = p * theta^(-2i/d)``.

    Both halves of ``head_dim`` share the frequencies (the LLaMA/HF "rotate_half" layout). The tables
    are non-persistent float32 buffers; ``reset_parameters`` recomputes them (after ``to_empty``).
    ``model.to(torch.bfloat16)`` casts them too, as it does the GaLore reference's cached tables.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        kw = dict(device=self.cos.device, dtype=torch.float32)
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, **kw) / self.head_dim)  # (head_dim / 2,)
        angles = torch.outer(torch.arange(self.max_positions, **kw), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (positions, head_dim)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]  # (seq, head_dim) each


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``; x is (batch, heads, seq, head_dim)."""
    a, b = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-b, a), dim=-1) * sin.to(x.dtype)


class LlamaAttention(nn.Module):
    """Causal multi-head self-attention with rotary embeddings on queries and keys."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = (proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (batch, heads, seq, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q k^T / sqrt(d) + mask) v
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, hidden))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x += attn(norm(x)); x += mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        # Registration order = HF's, so state_dict and parameter order (and optimizer state) line up.
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Token embeddings, the decoder layers and the final norm: (batch, seq) ids -> (batch, seq, hidden)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[-1]
        if seq > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq} exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                f"shorten the input or build the model with a larger max_position_embeddings"
            )
        cos, sin = self.rotary_emb(seq)
        x = self.embed_tokens(input_ids)  # (batch, seq, hidden)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, cos, sin, use_reentrant=False) if recompute else layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """LLaMA with an untied output head: ``forward(input_ids (batch, seq)) -> logits (batch, seq, vocab)``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Linear and Embedding weights ~ N(0, initializer_range), norm weights 1, rotary tables recomputed."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, self.config.initializer_range)
            elif isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))


def count_parameters(model: nn.Module, *, embeddings: bool = True) -> int:
    """Number of distinct parameters; ``embeddings=False`` leaves out ``embed_tokens`` and ``lm_head``."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()  # shared (tied) tensors are listed once
        if embeddings or not {"embed_tokens", "lm_head"} & set(name.split("."))
    )
