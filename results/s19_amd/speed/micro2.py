"""Time make train's main micro-batches at 4 x 4 against the same rows split as 2 x 8 and 1 x 16 (same gradient maths)."""
import time, torch
import distributed, train
from train_step import accumulate_gradients
from data.dataset import collate

config = train.resolve_defaults(train.TrainConfig(out="/tmp/s19/run", overwrite=True), torch.device("cpu"))
world = distributed.start(None)
t = train._setup(config, torch.device("cpu"), world)
model = t.model; model.train()
for step in [40, 41, 42, 43, 44, 45]:
    rows = sum(t.windows[step], [])
    out = {"real": sum(len(t.examples[i]["input_ids"]) for i in rows)}
    for size in (4, 2, 1, 4):
        groups = [rows[i:i + size] for i in range(0, len(rows), size)]
        batches = [collate([t.examples[i] for i in g], t.pad_id) for g in groups]
        s = time.time(); accumulate_gradients(model, batches, t.device, t.dtype, t.scaler); out[f"{size}x{16//size}"] = round(time.time() - s, 2)
        out[f"pad{size}"] = sum(b["input_ids"].numel() for b in batches)
        t.optimizer.zero_grad(set_to_none=True)
    print(step, out, flush=True)
