"""The compact LLaMA: same names and logits as transformers', causal, counted, checkpointed, validated."""

import pytest
import torch
import torch.nn.functional as F

from lrtrain.models import (
    LLAMA_SIZES,
    LlamaConfig,
    LlamaForCausalLM,
    build_model,
    count_parameters,
    linear_shapes,
    llama_config,
)
from lrtrain.optim import param_groups

transformers = pytest.importorskip("transformers", reason="transformers is needed to compare against its LLaMA")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=32, rope_theta=500.0, rms_norm_eps=1e-5)


def _hf_model(attn_implementation: str) -> torch.nn.Module:
    config = transformers.LlamaConfig(**TINY, num_key_value_heads=4, tie_word_embeddings=False, attention_bias=False,
                                      mlp_bias=False, use_cache=False, attn_implementation=attn_implementation)
    return transformers.LlamaForCausalLM(config).eval()


def _randomize_norms(model: torch.nn.Module) -> None:
    """Norm weights start at 1; perturb them so a misplaced weight shows up in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))


def _loss(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_names_and_logits_match_transformers(attn_implementation):
    ours = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    _randomize_norms(ours)
    theirs = _hf_model(attn_implementation)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    ids = torch.randint(0, TINY["vocab_size"], (3, 19))
    with torch.no_grad():
        expected = theirs(ids).logits
        logits = ours(ids)
    assert logits.shape == (3, 19, TINY["vocab_size"])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_build_model_transformers_matches_ours():
    sizes = dict(hidden_size=48, intermediate_size=136, num_attention_heads=3, num_hidden_layers=2, rope_theta=77.0)
    theirs = build_model("llama_tiny", 61, 24, source="transformers", **sizes).eval()
    ours = build_model("llama_tiny", 61, 24, **sizes).eval()
    assert isinstance(theirs, transformers.LlamaForCausalLM) and isinstance(ours, LlamaForCausalLM)
    assert theirs.config.tie_word_embeddings is False
    _randomize_norms(theirs)
    ours.load_state_dict(theirs.state_dict())
    ids = torch.randint(0, 61, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
    checkpointed = build_model("llama_tiny", 61, 24, source="transformers", gradient_checkpointing=True, **sizes)
    flag = "is_activation_checkpointing"  # transformers >= 5.23; the older name before
    flag = flag if hasattr(checkpointed, flag) else "is_gradient_checkpointing"
    assert getattr(checkpointed, flag) and not getattr(theirs, flag)


def test_changing_a_token_changes_no_earlier_logit():
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 17))
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] + 1 + torch.randint(0, 50, (2,))) % TINY["vocab_size"]
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :9], before[:, :9], atol=0, rtol=0)
    assert (after[:, 9:] - before[:, 9:]).abs().amax(dim=-1).min() > 1e-6


def test_parameter_count_of_llama_60m():
    h, ffn, layers, vocab = 512, 1376, 8, 32000
    per_layer = 4 * h * h + 3 * h * ffn + 2 * h
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config("llama_60m", vocab, 1024))
    assert count_parameters(model) == layers * per_layer + 2 * vocab * h + h == 58_073_600
    assert count_parameters(model, embeddings=False) == layers * per_layer + h


def test_meta_build_then_materialize_recomputes_rotary_tables():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.to_empty(device="cpu")
    model.reset_parameters()
    fresh = LlamaForCausalLM(LlamaConfig(**TINY))
    torch.testing.assert_close(model.model.rotary_emb.cos, fresh.model.rotary_emb.cos, atol=0, rtol=0)
    torch.testing.assert_close(model.model.rotary_emb.sin, fresh.model.rotary_emb.sin, atol=0, rtol=0)
    assert model.model.rotary_emb.cos.dtype == torch.float32
    assert torch.equal(model.model.layers[1].post_attention_layernorm.weight, torch.ones(TINY["hidden_size"]))
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002 and abs(model.lm_head.weight.std().item() - 0.02) < 0.002


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    plain = LlamaForCausalLM(LlamaConfig(**TINY)).train()
    ckpt = LlamaForCausalLM(LlamaConfig(**TINY, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, TINY["vocab_size"], (2, 15))
    loss_plain, loss_ckpt = _loss(plain, ids), _loss(ckpt, ids)
    loss_plain.backward()
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=0, rtol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-7, rtol=1e-6, msg=name)
    assert _saved_tensors(ckpt, ids) < _saved_tensors(plain, ids) / 3  # layer activations are recomputed


def _saved_tensors(model: LlamaForCausalLM, ids: torch.Tensor) -> int:
    """How many tensors autograd keeps for backward outside checkpointed regions."""
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, ids)
    return count


def test_param_groups_select_seven_matrices_per_layer():
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    plain, projected = param_groups(model, target_modules=["attn", "mlp"], rank=8)
    names = [n for n, _ in projected["params"]]
    assert len(names) == 7 * TINY["num_hidden_layers"]
    assert all(n.endswith("_proj.weight") for n in names)
    assert {n for n, _ in plain["params"]} >= {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    _, all_linear = param_groups(model, target_modules="all-linear", rank=8)
    assert sorted(n for n, _ in all_linear["params"]) == sorted(names)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="hidden_size=66 is not divisible by num_attention_heads=4"):
        LlamaConfig(**{**TINY, "hidden_size": 66})
    with pytest.raises(ValueError, match="head_dim .* 3 is odd"):
        LlamaConfig(**{**TINY, "hidden_size": 12})
    with pytest.raises(ValueError, match="num_hidden_layers must be a positive int"):
        LlamaConfig(**{**TINY, "num_hidden_layers": 0})
    with pytest.raises(ValueError, match="rms_norm_eps must be > 0"):
        LlamaConfig(**{**TINY, "rms_norm_eps": -1e-6})
    with pytest.raises(ValueError, match="known sizes: llama_tiny, llama_20m, llama_60m"):
        llama_config("llama_65m", 100)
    with pytest.raises(ValueError, match="unknown model source 'jax'"):
        build_model("llama_tiny", 100, 64, source="jax")


def test_too_long_sequence_is_an_error():
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    with pytest.raises(ValueError, match="sequence length 33 exceeds max_position_embeddings=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_named_sizes_and_overrides():
    assert {k: tuple(v.values()) for k, v in LLAMA_SIZES.items()} == {
        "llama_tiny": (128, 352, 4, 4), "llama_20m": (256, 688, 4, 4), "llama_60m": (512, 1376, 8, 8),
        "llama_130m": (768, 2048, 12, 12), "llama_350m": (1024, 2736, 16, 24), "llama_1b": (2048, 5461, 32, 24),
        "llama_7b": (4096, 11008, 32, 32),
    }
    config = llama_config("llama_20m", 500, 256, rope_theta=1e4 + 1, gradient_checkpointing=True)
    assert (config.hidden_size, config.head_dim, config.vocab_size) == (256, 64, 500)
    assert config.max_position_embeddings == 256
    assert config.rope_theta == 1e4 + 1 and config.gradient_checkpointing


@pytest.mark.parametrize("size", ["llama_tiny", "llama_20m"])
def test_linear_shapes_are_the_models_own(size):
    """The shapes the estimator and the benchmarks use are those of the decoder layers' Linear weights."""
    model = build_model(size, vocab_size=64, max_position_embeddings=16)
    weights = [tuple(m.weight.shape) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")]
    assert linear_shapes(size) == weights
    assert linear_shapes(size, layers=1) == weights[:7]
    with pytest.raises(ValueError, match="unknown LLaMA size"):
        linear_shapes("llama_3b")
