"""LoRA's settings (one set of defaults for the whole toolkit) and their form in PEFT's
adapter_config.json."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = "all-linear"
# Never adapted: the (tied) embedding and the output head are the vocabulary, not the decoder.
EXCLUDED_MODULES = ("embed_tokens", "lm_head")


def parse_target_modules(spec: str | Sequence[str]) -> tuple[str, ...] | str:
    """`"q_proj,v_proj"` or a list -> a tuple of names; `"all-linear"` stays as it is."""
    if isinstance(spec, str):
        if spec.strip() == ALL_LINEAR:
            return ALL_LINEAR
        spec = spec.split(",")
    names = tuple(name.strip() for name in spec if name.strip())
    if not names:
        raise ValueError("no target modules given")
    if any(name in EXCLUDED_MODULES for name in names):
        raise ValueError(f"LoRA is never applied to {', '.join(EXCLUDED_MODULES)}")
    return names


# Features of PEFT's LoRA config that change the maths; we refuse adapters that use them rather than
# load them wrongly. Each maps to the value that means "not used".
UNSUPPORTED_WHEN_SET = {
    "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {},
    "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "lora_bias": False,
    "use_qalora": False, "megatron_config": None,
}


class AdapterError(ValueError):
    """An adapter cannot be saved or loaded; the message is one line meant for the user."""


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = ATTENTION_MODULES
    use_rslora: bool = False
    base_model_name_or_path: str = ""
    trainable_token_indices: tuple[int, ...] = ()  # rows of the input (and tied output) embedding trained too

    def to_peft_json(self) -> dict:
        targets = self.target_modules if self.target_modules == ALL_LINEAR else list(self.target_modules)
        raw = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "target_modules": targets, "bias": "none",
            "use_rslora": self.use_rslora, "base_model_name_or_path": self.base_model_name_or_path,
        }
        if self.trainable_token_indices:  # written only when used: older PEFT versions reject the key
            raw["trainable_token_indices"] = list(self.trainable_token_indices)
        return raw

    @classmethod
    def from_peft_json(cls, raw: dict, source: str) -> LoRAConfig:
        if raw.get("peft_type") != "LORA":
            raise AdapterError(f"{source}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
        if raw.get("bias", "none") != "none":
            raise AdapterError(f"{source}: bias={raw['bias']!r} is not supported (only 'none')")
        for key, unused in UNSUPPORTED_WHEN_SET.items():
            if raw.get(key, unused) not in (unused, None, False, {}, []):
                raise AdapterError(f"{source}: {key}={raw[key]!r} is not supported")
        for key in ("r", "lora_alpha", "target_modules"):
            if key not in raw:
                # PEFT would silently default r and lora_alpha to 8; a wrong scale is worse than an error.
                raise AdapterError(f"{source}: missing {key!r}")
        targets = raw["target_modules"]
        if isinstance(targets, str) and targets != ALL_LINEAR:
            raise AdapterError(f"{source}: target_modules as a regular expression ({targets!r}) is not supported")
        if not isinstance(targets, str) and not (isinstance(targets, list) and targets
                                                 and all(isinstance(name, str) for name in targets)):
            raise AdapterError(f"{source}: target_modules must be a list of module names, got {targets!r}")
        _check_number(raw, "r", source, whole=True, low=1)
        _check_number(raw, "lora_alpha", source, low=0, low_open=True)
        _check_number({"lora_dropout": 0.0, **raw}, "lora_dropout", source, low=0)
        return cls(
            rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=targets if isinstance(targets, str) else tuple(sorted(targets)),
            use_rslora=bool(raw.get("use_rslora", False)),
            base_model_name_or_path=raw.get("base_model_name_or_path") or "",
            trainable_token_indices=_token_indices(raw.get("trainable_token_indices"), source),
        )


def _check_number(raw: dict, key: str, source: str, low: float, whole: bool = False, low_open: bool = False) -> None:
    """Raise AdapterError unless raw[key] is a JSON number (an integer if `whole`) above `low`."""
    value = raw[key]
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not (value > low if low_open else value >= low):
        kind = "an integer" if whole else "a number"
        raise AdapterError(f"{source}: {key} must be {kind} {'>' if low_open else '>='} {low}, got {value!r}")


def _token_indices(value: object, source: str) -> tuple[int, ...]:
    """PEFT's `trainable_token_indices`: a list of ids for the input embedding, or a dict keyed by the
    embedding's name; only the input embedding (`embed_tokens`) is supported."""
    if isinstance(value, dict):
        if set(value) != {"embed_tokens"}:
            raise AdapterError(f"{source}: trainable_token_indices for {sorted(value)} is not supported "
                               "(only embed_tokens)")
        value = value["embed_tokens"]
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise AdapterError(f"{source}: trainable_token_indices must be a list of token ids, got {value!r}")
    return tuple(value)
