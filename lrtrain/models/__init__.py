"""Models for pretraining: a compact LLaMA with the GaLore benchmark sizes."""

from __future__ import annotations

from torch import nn

from .llama import LLAMA_SIZES, LlamaConfig, LlamaForCausalLM, count_parameters, linear_shapes, llama_config

__all__ = ["LLAMA_SIZES", "LlamaConfig", "LlamaForCausalLM", "build_model", "count_parameters", "linear_shapes",
           "llama_config"]


def build_model(
    size: str, vocab_size: int, max_position_embeddings: int, source: str = "lrtrain", **overrides
) -> nn.Module:
    """A LLaMA of a named size (see ``LLAMA_SIZES``), randomly initialised.

    ``source="lrtrain"`` builds :class:`LlamaForCausalLM` (returns logits); ``source="transformers"``
    builds ``transformers.LlamaForCausalLM`` with the same sizes and weight names (returns an output
    object with ``.logits``). ``overrides`` replace :class:`LlamaConfig` fields.
    """
    config = llama_config(size, vocab_size, max_position_embeddings, **overrides)
    if source == "lrtrain":
        return LlamaForCausalLM(config)
    if source != "transformers":
        raise ValueError(f"unknown model source {source!r}; use 'lrtrain' or 'transformers'")
    try:
        import transformers
    except ImportError as err:
        raise ImportError("source='transformers' needs the transformers package: pip install transformers") from err
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        num_hidden_layers=config.num_hidden_layers,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        initializer_range=config.initializer_range,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(hf_config)
    if config.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
