"""Time the parts of make train's step: main micro-batches, DITTO looping batch with 2 rows vs 1 row."""
import time, sys, torch
import distributed, train
from train_step import accumulate_gradients, accumulate_repetition_gradients
from repetition import looping_batch
from data.dataset import collate

config = train.resolve_defaults(train.TrainConfig(out="/tmp/s19/run", overwrite=True), torch.device("cpu"))
world = distributed.start(None)
t = train._setup(config, torch.device("cpu"), world)
model = t.model; model.train()
for step in [40, 41, 42, 43]:
    batches = [collate([t.examples[i] for i in micro], t.pad_id) for micro in t.windows[step]]
    rows = [t.examples[i] for micro in t.windows[step] for i in micro]
    s = time.time(); accumulate_gradients(model, batches, t.device, t.dtype, t.scaler); main = time.time() - s
    out = {"main": main}
    for n in (2, 1):
        lb = looping_batch(rows, t.newline_ids, config.max_length, n, f"42:{step}:0", t.pad_id, 3)
        s = time.time(); accumulate_repetition_gradients(model, lb, 1.0, t.device, t.dtype, t.scaler); out[f"ditto{n}"] = time.time() - s
    t.optimizer.zero_grad(set_to_none=True)
    print(step, {k: round(v, 2) for k, v in out.items()}, flush=True)
