"""Ad hoc: the exact average of two rank-r LoRA adapters as one rank-2r adapter (A stacked, B side by side,
alpha kept so the scale alpha/2r halves), token rows averaged."""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

first, second, out = map(Path, sys.argv[1:4])
a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
merged = {}
for key in a:
    if key.endswith("lora_A.weight"):
        merged[key] = torch.cat([a[key], b[key]], dim=0)
    elif key.endswith("lora_B.weight"):
        merged[key] = torch.cat([a[key], b[key]], dim=1)
    else:
        merged[key] = (a[key] + b[key]) / 2
out.mkdir(parents=True, exist_ok=True)
save_file(merged, out / "adapter_model.safetensors", metadata={"format": "pt"})
config = json.loads((first / "adapter_config.json").read_text())
config["r"] *= 2
(out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
