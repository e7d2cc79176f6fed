"""train.py under torchrun with gloo on this CPU: 2 processes x batch 1 train like 1 process x batch 2,
a killed 2-process run resumes exactly, and a rank that cannot start stops the others at once."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import hardware
from test_train import adapter_tensors, assert_same_adapter, tiny_config, tiny_setup  # noqa: F401  (a fixture)
from training import loop
from training.checkpoint import CheckpointError, hold_output_folder
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
IN_FLOAT32 = (
    "import sys, torch, train\n"
    "from common import hardware\n"
    "hardware.pick_compute_dtype = lambda device: torch.float32\n"
    "sys.exit(train.main(sys.argv[1:]))\n"
)
KILL_AFTER_STEP_3 = (
    "import os, signal, sys\n"
    "from training import loop\n"
    "from training.arguments import parse_args\n"
    "loop.run(parse_args(sys.argv[1:]), after_step=lambda step: step == 3 and os.kill(os.getpid(), signal.SIGKILL))\n"
)


def torchrun(script: list[str], config: TrainConfig, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 SCRIPT --option value ...` for this config."""
    options = []
    for key, value in dataclasses.asdict(config).items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            options += [flag] if value else []
        elif value is not None and key != "device":
            options += [flag, str(value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               *script, *options]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def two_process_run(tiny_setup, tmp_path_factory):  # noqa: F811
    """A whole 2-process run (batch 1 per process), with dropout so each rank's random state matters."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    config = tiny_config(tiny_setup, out, batch_size=1)
    result = torchrun(["train.py"], config)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, result


def metric(out: Path, name: str) -> list[float]:
    return [m[name] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if name in m]


@pytest.mark.parametrize("repetition", [0.0, 1.0], ids=["plain", "one-looping-row"])
def test_two_processes_at_batch_1_train_like_one_process_at_batch_2(tiny_setup, tmp_path, monkeypatch,  # noqa: F811
                                                                   repetition):
    """With one looping row per step (pseudo-repetition), one of the two ranks has none: it must still take
    part in every collective (or the other waits for ever), and the two must train on the one process's rows."""
    # In float32: in bf16, batches padded to other widths round differently, and AdamW's first steps
    # (about lr x the gradient's sign) turn that into differences as large as the updates.
    monkeypatch.setattr(hardware, "pick_compute_dtype", lambda device: torch.float32)
    looping = dict(repetition=repetition, repetition_rows=1, repetition_from_copy=2)
    one = tmp_path / "one"
    loop.run(tiny_config(tiny_setup, one, batch_size=2, dropout=0.0, **looping))
    two = tmp_path / "two"
    script = tmp_path / "train_in_float32.py"
    script.write_text(IN_FLOAT32)
    result = torchrun([str(script)], tiny_config(tiny_setup, two, batch_size=1, dropout=0.0, **looping), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    single, double = adapter_tensors(one), adapter_tensors(two)
    assert single.keys() == double.keys()
    for key in single:  # atol: float32 sums in another order (an AVX2 CPU differed by 3e-6 in one of 256 values)
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=1e-5)
    assert metric(two, "loss") == pytest.approx(metric(one, "loss"), rel=1e-5)
    assert metric(two, "supervised_tokens") == metric(one, "supervised_tokens")
    assert metric(two, "held_out_loss") == pytest.approx(metric(one, "held_out_loss"), rel=1e-5)  # each row once
    assert result.stdout.count("done: trainable params") == 1  # rank 0 alone reports
    if repetition:
        assert len(metric(two, "repetition_loss")) == 6
        assert metric(two, "repetition_loss") == pytest.approx(metric(one, "repetition_loss"), rel=1e-5)


def test_a_killed_two_process_run_resumes_exactly(two_process_run, tiny_setup, tmp_path):  # noqa: F811
    config, _ = two_process_run
    killed = tiny_config(tiny_setup, tmp_path / "killed", batch_size=1)
    script = tmp_path / "kill_after_step_3.py"
    script.write_text(KILL_AFTER_STEP_3)
    result = torchrun([str(script)], killed)
    assert result.returncode != 0
    assert [path.name for path in Path(killed.out).glob("checkpoint-*")] == ["checkpoint-000002"]
    state = json.loads((Path(killed.out) / "checkpoint-000002" / "state.json").read_text())
    assert "python_rng1" in state and state["config"]["world_size"] == 2  # rank 1's random state is kept too
    result = torchrun(["train.py"], killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint-000002" in result.stdout
    assert_same_adapter(Path(config.out), Path(killed.out))


def test_resuming_with_another_process_count_is_refused(two_process_run, tmp_path):
    config, _ = two_process_run
    checkpoint = next(Path(config.out).glob("checkpoint-*"))
    out = tmp_path / "copy"
    out.mkdir()
    shutil.copytree(checkpoint, out / checkpoint.name)
    with pytest.raises(CheckpointError, match="was started with world_size=2, now world_size=1"):
        loop.run(dataclasses.replace(config, out=str(out)))


def test_a_rank_that_cannot_start_stops_the_others_with_one_line(tiny_setup, tmp_path):  # noqa: F811
    out = tmp_path / "busy"
    with hold_output_folder(out):  # another run holds the folder: rank 0 cannot start
        result = torchrun(["train.py"], tiny_config(tiny_setup, out, batch_size=1), timeout=120)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and f"{out} is in use by another training run (pid {os.getpid()})" in ours[0]
    workers_part = result.stderr.split("torch/distributed/elastic")[0]  # torchrun's own failure report follows
    assert ours[0] in workers_part and "Traceback" not in workers_part


def test_qlora_runs_under_torchrun_too(tiny_setup, tmp_path):  # noqa: F811
    config = tiny_config(tiny_setup, tmp_path / "qlora", batch_size=1, qlora=True, max_steps=2)
    result = torchrun(["train.py"], config)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((Path(config.out) / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["qlora"] and summary["processes"] == 2
