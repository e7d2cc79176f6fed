"""Gemma 2 / Gemma 3 hyperparameters as the GGUF keys llama.cpp reads for those architectures."""

from __future__ import annotations

from gguf import GGUFWriter, MODEL_ARCH, MODEL_ARCH_NAMES, RopeScalingType
from transformers import PretrainedConfig

from .errors import GGUFExportError

ARCHITECTURES = {"gemma2": MODEL_ARCH.GEMMA2, "gemma3_text": MODEL_ARCH.GEMMA3}


def gguf_architecture(config: PretrainedConfig) -> MODEL_ARCH:
    """The GGUF architecture of a Gemma 2 or Gemma 3 (text) model; GGUFExportError for any other, or
    for one whose attention llama.cpp would compute differently."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise GGUFExportError(f"cannot write a {config.model_type!r} model as GGUF; "
                              f"supported: Gemma 2 and Gemma 3 (text), i.e. {', '.join(ARCHITECTURES)}")
    # llama.cpp scales queries by 1/sqrt(head_dim) (27B models aside); transformers by the configured scalar.
    if config.query_pre_attn_scalar != config.head_dim:
        raise GGUFExportError(f"query_pre_attn_scalar {config.query_pre_attn_scalar} differs from head_dim "
                              f"{config.head_dim}: llama.cpp would scale this model's attention differently")
    if not config.tie_word_embeddings:
        raise GGUFExportError("the output head is not tied to the embedding, which llama.cpp's Gemma expects")
    return arch


def architecture_name(config: PretrainedConfig) -> str:
    return MODEL_ARCH_NAMES[gguf_architecture(config)]


def add_hyperparameters(writer: GGUFWriter, config: PretrainedConfig) -> None:
    """The {arch}.* keys: sizes, attention layout, the sliding window and which layers use it, RoPE,
    logit soft-capping. Written from the config itself, so llama.cpp needs none of its defaults."""
    arch = gguf_architecture(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
    _add_rope(writer, config)
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if arch == MODEL_ARCH.GEMMA2 and config.attn_logit_softcapping:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)


def _add_rope(writer: GGUFWriter, config: PretrainedConfig) -> None:
    """Global layers' RoPE base (and linear scaling, as the larger Gemma 3 models use); local layers' base."""
    parameters = config.rope_parameters or {}
    full = parameters.get("full_attention", parameters)
    writer.add_rope_freq_base(full["rope_theta"])
    if full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    elif full.get("rope_type", "default") != "default":
        raise GGUFExportError(f"RoPE type {full['rope_type']!r} is not written to GGUF here (only default and linear)")
    sliding = parameters.get("sliding_attention")
    if sliding:
        writer.add_rope_freq_base_swa(sliding["rope_theta"])
