"""A few steps on the real embedded Gemma 3 270M and corpus: LoRA and QLoRA train and the adapter loads."""

import json
import math

import peft
import pytest
import torch

from common import hardware
from gemma import loading
from lora import load_adapter
from training import loop
from training.config import TrainConfig


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_a_few_steps_on_the_embedded_model(tmp_path, qlora, capsys):
    config = TrainConfig(qlora=qlora, out=str(tmp_path / "run"), batch_size=2, grad_accum=1, max_steps=2,
                               max_length=192, eval_rows=4, eval_every=2)
    summary = loop.run(config)
    assert summary["steps"] == 2
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["held_out_loss_after"])
    assert summary["trainable_params"] == 1_474_560 + 2 * 640  # LoRA r=16 on q/k/v/o + the two marker rows
    # The turn markers' rows in this pretrained checkpoint were never trained: the log says so.
    log = capsys.readouterr().out
    cpu = torch.device("cpu")
    assert hardware.describe_compute(cpu, hardware.pick_compute_dtype(cpu)) in log
    assert summary["compute_dtype"] == hardware.dtype_name(hardware.pick_compute_dtype(cpu))
    assert "<start_of_turn> (105)" in log and "<end_of_turn> (106)" in log and log.count("looks untrained") == 2
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] == [105, 106]

    ids = torch.tensor([[2, 105, 2364, 107, 3689, 236746, 106, 107, 105, 4368, 107]])
    ours = loading.load_model(loading.EMBEDDED_MODEL, torch.device("cpu"), torch.float32)
    load_adapter(ours, tmp_path / "run")
    reference = peft.PeftModel.from_pretrained(
        loading.load_model(loading.EMBEDDED_MODEL, torch.device("cpu"), torch.float32), tmp_path / "run")
    with torch.no_grad():
        difference = (ours(ids).logits - reference(ids).logits).abs().max().item()
    assert difference < 1e-3, difference
