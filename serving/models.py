"""The models a server answers for: the base model and each adapter, sharing the base's weights.

LoRA adapters and the base itself share one copy of the base model (lora.multi.AdapterSet); QLoRA
adapters share a second one, quantized to NF4, because they were trained on that 4-bit base. A batch
may then hold requests for any models on the same copy: each row uses its own adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common import hardware
from gemma import loading
from gemma.generation import Generator, load_base
from lora.adapter import trained_on_nf4
from lora.multi import BASE_SLOT, AdapterSet

BASE = "base"


@dataclass(frozen=True)
class ServedModel:
    generator: Generator  # the same for every model on one copy of the base
    adapters: AdapterSet  # the adapters on that copy
    slot: int  # this model's adapter in it (BASE_SLOT: the base alone)


def load_models(model_name: str, adapters: dict[str, Path], device: str | None) -> dict[str, ServedModel]:
    """"base" and every adapter by name. Raises loading.ModelLoadError or lora.AdapterError (one line)."""
    target = hardware.pick_device(device)
    tokenizer = loading.load_tokenizer(model_name)
    copies: dict[bool, tuple[Generator, AdapterSet]] = {}

    def copy_for(nf4: bool) -> tuple[Generator, AdapterSet]:
        if nf4 not in copies:
            model = load_base(model_name, target, nf4)
            copies[nf4] = Generator(model, tokenizer), AdapterSet(model)
        return copies[nf4]

    generator, shared = copy_for(False)
    models = {BASE: ServedModel(generator, shared, BASE_SLOT)}
    for name, folder in adapters.items():
        generator, shared = copy_for(trained_on_nf4(folder))
        models[name] = ServedModel(generator, shared, shared.add(name, folder))
    return models


def memory_report(models: dict[str, ServedModel]) -> dict:
    """What the models hold: copies of the base and their size, the adapters' size, and the process's
    resident memory (None where the system does not say)."""
    copies = {id(served.adapters): served.adapters for served in models.values()}.values()
    base_bytes = sum(tensor.nbytes for shared in copies
                     for tensor in [*shared.model.parameters(), *shared.model.buffers()])
    resident = hardware.process_memory_kib()
    return {"base_copies": len(copies), "base_mib": round(base_bytes / 2**20, 1),
            "adapters": sum(len(shared.names) for shared in copies),
            "adapters_mib": round(sum(shared.adapter_bytes() for shared in copies) / 2**20, 2),
            "resident_mib": round(resident / 1024, 1) if resident is not None else None}
