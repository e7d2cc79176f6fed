"""The training loop: schedule, loss, accumulation, checkpoints and resume, errors."""

import dataclasses
import json
import math
import os
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from common import hardware
from conftest import build_tiny_model, make_tiny_tokenizer
from data.dataset import collate, encode_example
from gemma import loading
from lora import LoRAConfig, inject_lora, inject_trainable_tokens, load_adapter, lora_parameter_count
from training import loop
from training.arguments import parse_args
from training.checkpoint import CheckpointError, checkpoint_dirs, hold_output_folder
from training.config import STUDY, TrainConfig, resolve_defaults
from training.distributed import World
from training.loss import count_supervised, supervised_loss_sum
from training.optimizer import learning_rate, warmup_for
from training.run_log import summary_line
from training.setup import TrainError, apply_speed_options, compiles_layers
from training.step import accumulate_gradients

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ schedule

def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_zero():
    lrs = [learning_rate(step, 1e-3, warmup=10, total=110) for step in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway down: 5e-4
    assert learning_rate(110, 1e-3, 10, 110) == pytest.approx(0.0, abs=1e-12)


def test_warmup_by_default_is_5_percent_of_the_run_and_at_most_the_study_s_150():
    assert warmup_for(3141, None) == 150  # the study's run
    assert warmup_for(100, None) == 5
    assert warmup_for(3, None) == 1


def test_an_explicit_warmup_is_applied_as_asked_and_one_longer_than_the_run_is_refused():
    assert warmup_for(100, 50) == 50 and warmup_for(100, 0) == 0 and warmup_for(100, 100) == 100
    with pytest.raises(ValueError, match="--warmup-steps 101 is longer than the run"):
        warmup_for(100, 101)


def test_the_recipe_fills_only_what_the_user_left_to_it():
    embedded = resolve_defaults(TrainConfig())
    assert (embedded.epochs, embedded.max_length, embedded.lr, embedded.token_lr_scale) == (2, 256, 1e-3, 2.5)
    assert (embedded.repetition, embedded.repetition_from_copy) == (1.0, 3)  # DITTO in the embedded recipe only
    # The token rows' own rate is the same 2.5e-3 as in the study's recipe: only the LoRA rate moved.
    assert embedded.lr * embedded.token_lr_scale == pytest.approx(STUDY.lr * STUDY.token_lr_scale)
    for config in (TrainConfig(model="google/gemma-2-2b"), TrainConfig(dataset="rows.jsonl")):
        resolved = resolve_defaults(config)
        assert (resolved.epochs, resolved.max_length, resolved.lr, resolved.token_lr_scale) == (3, 768, 2.5e-4, 10.0)
        assert resolved.repetition == 0.0
    chosen = resolve_defaults(parse_args(["--lr", "3e-4", "--epochs", "1"]))
    assert (chosen.lr, chosen.epochs, chosen.max_length, chosen.token_lr_scale) == (3e-4, 1, 256, 2.5)


def test_make_train_records_the_same_recipe_on_a_cpu_and_on_a_gpu():
    """The train_config.json of `make train --device cpu` and of the same on a device named cuda (resolved as
    the run resolves it; no GPU needed): only the device differs. Compiling, a speed option whose default is
    on CUDA only, is decided when the model is set up and recorded in train_summary.json."""
    on_cpu = parse_args(["--device", "cpu"])
    on_gpu = dataclasses.replace(on_cpu, device="cuda")  # parse_args would check that this machine has one
    records = {config.device: loop.run_settings(resolve_defaults(config), World(device=torch.device(config.device)))
               for config in (on_cpu, on_gpu)}
    assert {key for key in records["cpu"] if records["cpu"][key] != records["cuda"][key]} == {"device"}
    assert records["cuda"]["lr"] == 1e-3 and records["cuda"]["repetition"] == 1.0  # the embedded recipe
    assert records["cuda"]["compile"] is None
    assert not compiles_layers(on_cpu, torch.device("cpu")) and compiles_layers(on_gpu, torch.device("cuda"))


# ------------------------------------------------------------------ loss

def make_examples(tokenizer, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        length = int(torch.randint(3, 30, (1,), generator=generator))
        body = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (length,), generator=generator))
        examples.append(encode_example(tokenizer, f"task {index}", "", f"def f():\n    return '{body}'"))
    return examples


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_supervised_loss_equals_the_model_s_own_loss(kind):
    tokenizer = make_tiny_tokenizer()
    model = build_tiny_model(kind)
    batch = collate(make_examples(tokenizer, 3), tokenizer.pad_token_id)
    with torch.no_grad():
        ours = supervised_loss_sum(model, batch) / count_supervised(batch)
        reference = model(**batch).loss  # transformers' mean cross-entropy over labelled positions
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_accumulation_4x4_gives_the_same_gradient_as_16x1():
    tokenizer = make_tiny_tokenizer()
    examples = make_examples(tokenizer, 16)
    gradients = []
    for micro_batch in (16, 4):
        model = build_tiny_model("gemma3")
        inject_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
        for layer_name, parameter in model.named_parameters():  # non-zero B so A gets gradients too
            if ".lora_B." in layer_name:
                torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(1))
        batches = [collate(examples[i:i + micro_batch], tokenizer.pad_token_id) for i in range(0, 16, micro_batch)]
        accumulate_gradients(model, batches, torch.device("cpu"), torch.float32)
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-4, atol=1e-6)


def window_gradients(kind: str, compile_layers: bool = False, checkpoint_layers: bool = False):
    """(loss, gradients, (forward calls of layer 0's MLP, compiled layers)) of one 2 x 2 accumulation window on a tiny model
    with LoRA (dropout 0.1, masks drawn from the same seed) and token rows."""
    tokenizer = make_tiny_tokenizer()
    examples = make_examples(tokenizer, 4)
    model = build_tiny_model(kind)
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.1))
    inject_trainable_tokens(model, (4, 5))
    for layer_name, parameter in model.named_parameters():  # non-zero B so A gets gradients too
        if ".lora_B." in layer_name:
            torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(1))
    calls = []
    if not compile_layers:  # a Python hook inside a compiled layer is traced, not called
        model.model.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    apply_speed_options(model, compile_layers, checkpoint_layers)
    model.train()
    batches = [collate(examples[i:i + 2], tokenizer.pad_token_id) for i in (0, 2)]
    torch.manual_seed(0)
    loss, _ = accumulate_gradients(model, batches, torch.device("cpu"), torch.float32)
    compiled = sum(layer._compiled_call_impl is not None for layer in model.model.layers)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, (len(calls), compiled)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
@pytest.mark.parametrize("option", ["compile", "checkpoint"])
def test_compiled_or_checkpointed_layers_give_the_eager_loss_and_gradients(kind, option):
    """Gemma 2's soft-capped attention included: the options change speed and memory, not the maths
    (the compiled layers' dropout draws the eager masks: with inductor's own generator the gradients differ)."""
    eager_loss, eager, eager_calls = window_gradients(kind)
    loss, gradients, calls = window_gradients(kind, compile_layers=option == "compile",
                                              checkpoint_layers=option == "checkpoint")
    # Checkpointing runs each layer again in the backward pass (2 micro-batches: 2 calls -> 4).
    assert eager_calls == (2, 0) and calls == {"checkpoint": (4, 0), "compile": (0, 2)}[option]
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    assert gradients.keys() == eager.keys() and any("trainable_tokens" in name for name in eager)
    for name in eager:
        torch.testing.assert_close(gradients[name], eager[name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ whole runs on a tiny model

@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny Gemma 3 folder and a 60-row Alpaca-style dataset."""
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_model("gemma3").save_pretrained(root / "model")
    make_tiny_tokenizer().save_pretrained(root / "model")
    rows = [{"instruction": f"Return {i} squared.", "input": "" if i % 3 else f"n = {i}",
             "output": f"def square_{i}():\n    return {i} * {i}"} for i in range(60)]
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def tiny_config(setup: Path, out: Path, **changes) -> TrainConfig:
    settings = dict(model=str(setup / "model"), dataset=str(setup / "rows.jsonl"), out=str(out), rank=4,
                    dropout=0.1, batch_size=2, grad_accum=2, lr=1e-2, epochs=1, max_steps=6, max_length=128,
                    save_every=2, eval_every=3, eval_rows=4)
    settings.update(changes)
    return TrainConfig(**settings)


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def assert_same_adapter(first: Path, second: Path):
    a, b = adapter_tensors(first), adapter_tensors(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_writes_adapter_metrics_plot_and_summary(tiny_setup, tmp_path):
    summary = loop.run(tiny_config(tiny_setup, tmp_path / "run"))
    out = tmp_path / "run"
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "training_loss.png",
                 "train_summary.json", "train_config.json", "checkpoint-000006"):
        assert (out / name).exists(), name
    assert summary["steps"] == 6 and math.isfinite(summary["final_train_loss"])
    assert summary["warmup_steps"] == 1  # 5% of 6 steps
    assert summary["compiled_layers"] is False  # the default on the CPU
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in metrics if "held_out_loss" in m] == [0, 3, 6]
    assert len(list(out.glob("checkpoint-*"))) == 1, "older checkpoints are removed"
    model = build_tiny_model("gemma3")
    load_adapter(model, out)  # the result loads as an adapter
    assert summary_line(summary).startswith("done: trainable params")


def test_unlikelihood_changes_training_but_not_the_held_out_loss_s_meaning(tiny_setup, tmp_path):
    """--unlikelihood 1 trains another adapter, is recorded with the run, and adds to the train loss only."""
    loop.run(tiny_config(tiny_setup, tmp_path / "plain"))
    loop.run(tiny_config(tiny_setup, tmp_path / "unlikelihood", unlikelihood=1.0))
    plain, pushed = adapter_tensors(tmp_path / "plain"), adapter_tensors(tmp_path / "unlikelihood")
    assert any(not torch.equal(plain[key], pushed[key]) for key in plain)
    assert json.loads((tmp_path / "unlikelihood" / "train_config.json").read_text())["unlikelihood"] == 1.0
    metrics = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("plain", "unlikelihood")}
    first_loss = {name: next(m["loss"] for m in lines if "loss" in m) for name, lines in metrics.items()}
    held_out_at_0 = {name: lines[0]["held_out_loss"] for name, lines in metrics.items()}
    assert first_loss["unlikelihood"] > first_loss["plain"]  # the same first step, plus the term
    assert held_out_at_0["unlikelihood"] == held_out_at_0["plain"]


def test_repetition_rows_is_the_looping_batch_s_size(tiny_setup, tmp_path, monkeypatch):
    """--repetition-rows N: each optimizer step's looping batch has N rows (made from that step's rows)."""
    sizes = []

    def spy(*args, **kwargs):
        batch = train_looping_batch(*args, **kwargs)
        sizes.append(len(batch["input_ids"]))
        return batch

    train_looping_batch = loop.looping_batch
    monkeypatch.setattr(loop, "looping_batch", spy)
    loop.run(tiny_config(tiny_setup, tmp_path / "run", repetition=1.0, repetition_rows=3, max_steps=2))
    assert sizes == [3, 3]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["repetition_rows"] == 3


def run_in_a_fresh_process(config: TrainConfig, kill_after_step: int | None = None) -> int:
    """loop.run(config) in a new Python process (its own compilations, as after a restart): the exit code."""
    after_step = "None"
    if kill_after_step is not None:
        after_step = f"lambda step: step == {kill_after_step} and os.kill(os.getpid(), signal.SIGKILL)"
    script = (
        "import os, signal\n"
        "from training import loop\n"
        "from training.config import TrainConfig\n"
        f"loop.run(TrainConfig(**{dataclasses.asdict(config)!r}), after_step={after_step})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode in (0, -9), result.stderr[-2000:]
    return result.returncode


@pytest.mark.parametrize("compile_layers", [False, True])
def test_killed_run_resumes_bit_for_bit(tiny_setup, tmp_path, compile_layers):
    """Each part of the run in its own process, as in real use (with compiled layers, a process that had compiled
    other models' layers before could leave some eager after dynamo's recompilation limit: equal to rounding only)."""
    run_in_a_fresh_process(tiny_config(tiny_setup, tmp_path / "straight", compile=compile_layers))
    killed = tiny_config(tiny_setup, tmp_path / "killed", compile=compile_layers)
    # SIGKILL right after step 3 (the last checkpoint is step 2): nothing gets a chance to clean up.
    assert run_in_a_fresh_process(killed, kill_after_step=3) == -9
    assert [p.name for p in Path(killed.out).glob("checkpoint-*")] == ["checkpoint-000002"]
    assert not (Path(killed.out) / "adapter_model.safetensors").exists()
    assert run_in_a_fresh_process(killed) == 0
    assert_same_adapter(tmp_path / "straight", Path(killed.out))
    metrics = [json.loads(line) for line in (Path(killed.out) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]


def interrupt_at(stop: int):
    def interrupt(step: int) -> None:
        if step == stop:
            raise KeyboardInterrupt
    return interrupt


@pytest.mark.parametrize("compile_layers", [False, True])
def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tiny_setup, tmp_path, compile_layers):
    """With compiled layers too."""
    loop.run(tiny_config(tiny_setup, tmp_path / "straight", compile=compile_layers))
    with pytest.raises(TrainError, match="checkpoint at step 3"):
        loop.run(tiny_config(tiny_setup, tmp_path / "interrupted", compile=compile_layers), after_step=interrupt_at(3))
    loop.run(tiny_config(tiny_setup, tmp_path / "interrupted", compile=compile_layers))
    assert_same_adapter(tmp_path / "straight", tmp_path / "interrupted")


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_an_interrupt_inside_the_optimizer_s_update_resumes_bit_for_bit(tiny_setup, tmp_path, monkeypatch,
                                                                        signal_number):
    """The signal lands after AdamW has updated the weights and its moments and before the loop has counted
    the step: the checkpoint must hold that step as done, or the resumed run applies it twice."""
    loop.run(tiny_config(tiny_setup, tmp_path / "straight"))
    update, updates = torch.optim.AdamW.step, []

    def update_then_interrupt(self, *args, **kwargs):
        result = update(self, *args, **kwargs)
        updates.append(len(updates) + 1)
        if len(updates) == 3:
            os.kill(os.getpid(), signal_number)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", update_then_interrupt)
    # As in train.py's own process: Ctrl-C raises KeyboardInterrupt, and `kill` too (train.py maps it). The
    # suite's earlier tests may have left another SIGINT handler behind (an event loop's).
    previous = {number: signal.signal(number, signal.default_int_handler) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(TrainError, match="checkpoint at step 3"):
            loop.run(tiny_config(tiny_setup, tmp_path / "interrupted"))
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    monkeypatch.undo()
    loop.run(tiny_config(tiny_setup, tmp_path / "interrupted"))
    assert_same_adapter(tmp_path / "straight", tmp_path / "interrupted")


def test_a_run_resumed_with_the_other_compile_setting_trains_the_same_adapter(tiny_setup, tmp_path, monkeypatch):
    """--compile may change between the parts of a run: the same dropout masks, so the same adapter up to rounding
    (with inductor's own random numbers the masks differ, and so do the rows, by ~0.2 here). In float32: in bf16
    the compiled layers round differently from eager ones on some CPUs, and this run's lr 1e-2 AdamW steps turn
    that into differences of ~0.06 after 3 steps even without dropout."""
    monkeypatch.setattr(hardware, "pick_compute_dtype", lambda device: torch.float32)
    loop.run(tiny_config(tiny_setup, tmp_path / "eager"))
    switched = tmp_path / "switched"
    with pytest.raises(TrainError, match="checkpoint at step 3"):
        loop.run(tiny_config(tiny_setup, switched, compile=True), after_step=interrupt_at(3))
    loop.run(tiny_config(tiny_setup, switched, compile=False))
    eager, resumed = adapter_tensors(tmp_path / "eager"), adapter_tensors(switched)
    for key in eager:
        torch.testing.assert_close(resumed[key], eager[key], rtol=1e-4, atol=1e-4)


def test_a_resumed_run_s_wall_time_adds_the_earlier_parts(tiny_setup, tmp_path):
    out = tmp_path / "two_parts"
    with pytest.raises(TrainError):
        loop.run(tiny_config(tiny_setup, out), after_step=interrupt_at(3))
    metrics = out / "metrics.jsonl"
    entries = [json.loads(line) for line in metrics.read_text().splitlines()]
    for entry in entries:  # as if the first part had taken an hour
        if "wall_s" in entry:
            entry["wall_s"] += 3600.0
    metrics.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    summary = loop.run(tiny_config(tiny_setup, out))
    walls = [json.loads(line).get("wall_s") for line in metrics.read_text().splitlines()]
    steps = [wall for wall in walls if wall is not None]
    assert len(steps) == 6 and steps == sorted(steps) and 3600 < steps[3] < 3600 + 60
    assert steps[-1] <= summary["wall_s"] < 3600 + 60


def step_lines(out: Path) -> list[dict]:
    """metrics.jsonl's entries without the timings, which differ from run to run."""
    timings = {"seconds", "tokens_per_s", "wall_s", "peak_memory_gb"}
    return [{key: value for key, value in json.loads(line).items() if key not in timings}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_s_train_config_json_re_run_with_max_steps_trains_the_run_s_first_steps(tiny_setup, tmp_path):
    """python train.py --config RUN/train_config.json --out NEW --max-steps 2: the run's first two steps, line for
    line in metrics.jsonl (timings aside). The run's 27 steps warm up over 2; without the schedule its record
    keeps, a 2-step run warms up over 1 and differs from step 2 on."""
    loop.run(tiny_config(tiny_setup, tmp_path / "whole", epochs=2, max_steps=None))
    record = tmp_path / "whole" / "train_config.json"
    assert json.loads(record.read_text())["schedule_steps"] == 27
    assert json.loads((tmp_path / "whole" / "train_summary.json").read_text())["warmup_steps"] == 2
    again = ["--config", str(record), "--max-steps", "2"]
    assert train.main([*again, "--out", str(tmp_path / "first")]) == 0
    assert train.main([*again, "--out", str(tmp_path / "own"), "--schedule-steps", "2"]) == 0
    first_steps = [line for line in step_lines(tmp_path / "whole") if line["step"] <= 2][:3]  # held-out at 0, steps 1-2
    assert [line["step"] for line in first_steps] == [0, 1, 2]
    assert step_lines(tmp_path / "first")[:3] == first_steps
    assert step_lines(tmp_path / "own")[2]["loss"] != first_steps[2]["loss"]


def test_tensorboard_holds_every_number_of_metrics_jsonl_once_through_a_resume_and_a_fresh_start(tiny_setup, tmp_path):
    """--report-to tensorboard, read back from the event files: the training loss of every step, the learning rate,
    tokens/s, memory and the held-out losses, each at its step. A run that dies after its checkpoint at step 2
    has logged step 3, which the resumed run logs again; a fresh start (--overwrite) hides the earlier run's."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"

    def die_after_step_3(step: int) -> None:
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        loop.run(tiny_config(tiny_setup, out, report_to="tensorboard"), after_step=die_after_step_3)
    loop.run(tiny_config(tiny_setup, out, report_to="tensorboard"))

    def assert_tensorboard_holds_metrics_jsonl(steps: int) -> None:
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        events = EventAccumulator(str(out / "tensorboard")).Reload()
        assert [event.step for event in events.Scalars("loss")] == list(range(1, steps + 1))
        for name in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gb", "held_out_loss", "held_out_end_loss"):
            expected = [(entry["step"], entry[name]) for entry in metrics if name in entry]
            logged = [(event.step, event.value) for event in events.Scalars(name)]
            assert [step for step, _ in logged] == [step for step, _ in expected], name
            assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6), name

    assert_tensorboard_holds_metrics_jsonl(steps=6)
    loop.run(tiny_config(tiny_setup, out, report_to="tensorboard", max_steps=4, overwrite=True))
    assert_tensorboard_holds_metrics_jsonl(steps=4)


def test_a_schedule_shorter_than_the_run_is_refused(tiny_setup, tmp_path):
    with pytest.raises(TrainError, match=r"--schedule-steps 3 is shorter than the run \(6 optimizer steps\)"):
        loop.run(tiny_config(tiny_setup, tmp_path / "run", schedule_steps=3))
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_from_before_the_schedule_was_recorded_resumes(tiny_setup, tmp_path):
    loop.run(tiny_config(tiny_setup, tmp_path / "straight"))
    out = tmp_path / "run"
    with pytest.raises(TrainError):
        loop.run(tiny_config(tiny_setup, out), after_step=interrupt_at(2))
    state_file = out / "checkpoint-000002" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["schedule_steps"]
    state_file.write_text(json.dumps(state))
    loop.run(tiny_config(tiny_setup, out))
    assert_same_adapter(tmp_path / "straight", out)


def test_resume_with_a_changed_config_is_refused_unless_overwrite(tiny_setup, tmp_path):
    out = tmp_path / "run"
    loop.run(tiny_config(tiny_setup, out, max_steps=2))
    with pytest.raises(CheckpointError, match="lr=0.01, now lr=0.02"):
        loop.run(tiny_config(tiny_setup, out, max_steps=2, lr=2e-2))
    summary = loop.run(tiny_config(tiny_setup, out, max_steps=2, lr=2e-2, overwrite=True))
    assert summary["steps"] == 2


def test_a_half_written_checkpoint_is_ignored_on_resume(tiny_setup, tmp_path):
    loop.run(tiny_config(tiny_setup, tmp_path / "straight"))
    out = tmp_path / "run"
    with pytest.raises(TrainError):
        loop.run(tiny_config(tiny_setup, out), after_step=interrupt_at(2))
    # A crash while writing leaves only a temporary folder, which resuming ignores.
    (out / ".checkpoint-abc123").mkdir()
    (out / ".checkpoint-abc123" / "state.json").write_text("{trunc")
    assert checkpoint_dirs(out) == [out / "checkpoint-000002"]
    loop.run(tiny_config(tiny_setup, out))
    assert_same_adapter(tmp_path / "straight", out)


@pytest.mark.parametrize("damage, reason", [
    (lambda checkpoint: (checkpoint / "state.json").unlink(), "state.json: .*No such file"),
    (lambda checkpoint: (checkpoint / "state.json").write_text('{"step": 2, "conf'), "state.json: Unterminated string"),
    (lambda checkpoint: (checkpoint / "trainer_state.safetensors").write_bytes(
        (checkpoint / "trainer_state.safetensors").read_bytes()[:100]), "trainer_state.safetensors: .*header"),
    (lambda checkpoint: (checkpoint / "adapter_model.safetensors").write_bytes(b"x" * 10),
     "adapter_model.safetensors: .*not a readable safetensors file"),
])
def test_a_damaged_checkpoint_is_named_in_one_line_and_nothing_is_lost(tiny_setup, tmp_path, damage, reason):
    out = tmp_path / "run"
    with pytest.raises(TrainError):
        loop.run(tiny_config(tiny_setup, out), after_step=interrupt_at(2))
    checkpoint = out / "checkpoint-000002"
    damage(checkpoint)
    files = sorted(path.name for path in checkpoint.iterdir())
    with pytest.raises(CheckpointError, match=rf"checkpoint {checkpoint} is damaged: {reason}.*; delete the checkpoint"):
        loop.run(tiny_config(tiny_setup, out))
    assert sorted(path.name for path in checkpoint.iterdir()) == files


def test_an_adapter_without_a_checkpoint_is_not_overwritten_without_overwrite(tiny_setup, tmp_path):
    out = tmp_path / "run"
    loop.run(tiny_config(tiny_setup, out, max_steps=2))
    for checkpoint in checkpoint_dirs(out):  # as when an adapter folder is copied without its checkpoint
        shutil.rmtree(checkpoint)
    adapter = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="holds an adapter but no checkpoint"):
        loop.run(tiny_config(tiny_setup, out, max_steps=2))
    assert (out / "adapter_model.safetensors").read_bytes() == adapter and (out / "metrics.jsonl").exists()
    assert loop.run(tiny_config(tiny_setup, out, max_steps=2, overwrite=True))["steps"] == 2


def test_a_second_run_on_the_same_out_fails_at_once_naming_the_first(tiny_setup, tmp_path):
    out = tmp_path / "run"
    with hold_output_folder(out):  # as a first run would, in another process
        with pytest.raises(CheckpointError, match=rf"{out} is in use by another training run \(pid {os.getpid()}\)"):
            loop.run(tiny_config(tiny_setup, out, max_steps=2))
        assert sorted(path.name for path in out.iterdir()) == [".lock"]  # nothing written beside it
    assert loop.run(tiny_config(tiny_setup, out, max_steps=2))["steps"] == 2  # the lock went with its holder


@pytest.mark.parametrize("place", ["a-file", "a-file/run"])
def test_an_out_that_cannot_be_a_folder_is_one_error_before_any_work(tiny_setup, tmp_path, place, monkeypatch):
    (tmp_path / "a-file").write_text("precious")
    monkeypatch.setattr(loading, "load_tokenizer", lambda *_: pytest.fail("work started"))
    with pytest.raises(CheckpointError, match=f"--out {tmp_path / place} cannot be a folder"):
        loop.run(tiny_config(tiny_setup, tmp_path / place, max_steps=2))
    assert (tmp_path / "a-file").read_text() == "precious"


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_a_damaged_one_is_named(tiny_setup, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(TrainError):
        loop.run(tiny_config(tiny_setup, out), after_step=interrupt_at(2))
    metrics = out / "metrics.jsonl"
    intact = metrics.read_text()
    metrics.write_text(intact + '{"step": 3, "lo')
    assert loop.run(tiny_config(tiny_setup, out))["steps"] == 6
    assert f"{metrics} line {len(intact.splitlines()) + 1} was cut off when the run stopped: dropped" in capsys.readouterr().err

    damaged = tmp_path / "damaged"
    with pytest.raises(TrainError):
        loop.run(tiny_config(tiny_setup, damaged), after_step=interrupt_at(2))
    lines = (damaged / "metrics.jsonl").read_text().splitlines()
    (damaged / "metrics.jsonl").write_text("\n".join(["{oops", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 1 is damaged"):
        loop.run(tiny_config(tiny_setup, damaged))


def test_written_files_get_the_users_usual_mode(tiny_setup, tmp_path):
    out = tmp_path / "run"
    loop.run(tiny_config(tiny_setup, out, max_steps=2))
    umask = os.umask(0)
    os.umask(umask)
    expected = 0o666 & ~umask
    for path in [out / "adapter_model.safetensors", out / "adapter_config.json", *checkpoint_dirs(out)[-1].iterdir()]:
        assert path.stat().st_mode & 0o777 == expected, path


def run_cli(capsys, *args) -> tuple[int, str]:
    """train.py's main() in-process: (exit code, stderr)."""
    try:
        code = train.main(list(args))
    except SystemExit as exit_:  # argparse exits on bad arguments
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "'/nonexistent/model' is neither a local model folder nor a model on the Hugging Face Hub"),
    (["--rank", "0"], "argument --rank: must be >= 1, got 0"),
    (["--max-steps", "0"], "argument --max-steps: must be >= 1"),
    (["--epochs", "-1"], "argument --epochs: must be >= 1"),
    (["--epochs", "two"], "argument --epochs: 'two' is not a whole number"),
    (["--grad-clip", "-1"], "argument --grad-clip: must be > 0"),
    (["--token-lr-scale", "0"], "argument --token-lr-scale: must be > 0"),
    (["--lr", "nan"], "argument --lr: must be > 0"),
    (["--dropout", "1"], "argument --dropout: must be in [0, 1)"),
    (["--trainable-tokens", "<no_such_token>"], "not a single token of this tokenizer"),
    (["--repetition", "-0.5"], "argument --repetition: must be >= 0"),
    (["--repetition-rows", "0"], "argument --repetition-rows: must be >= 1"),
    (["--report-to", "wandb"], "argument --report-to: must be one of none, tensorboard, got 'wandb'"),
])
def test_bad_inputs_fail_with_one_clear_line(capsys, tmp_path, args, message):
    code, stderr = run_cli(capsys, *args, "--out", str(tmp_path / "out"))
    assert code == 2 and message in stderr.strip().splitlines()[-1]  # argparse prints its usage above
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists(), "a failed start leaves nothing behind"


def test_without_held_out_rows_the_held_out_loss_is_not_measured_rather_than_zero(capsys, tiny_setup, tmp_path):
    rows = tmp_path / "four.jsonl"  # grouped rows: 10% of 4 rounds to no held-out group at all
    rows.write_text("".join(json.dumps({"instruction": f"Return {i}.", "output": f"def f():\n    return {i}",
                                        "group": f"g{i}"}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    code = train.main(["--model", str(tiny_setup / "model"), "--dataset", str(rows), "--out", str(out),
                       "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "the held-out loss is not measured" in printed
    assert "held-out loss not measured (no held-out rows)" in printed.splitlines()[-1]
    assert not any("held_out_loss" in line for line in (out / "metrics.jsonl").read_text().splitlines())
    assert json.loads((out / "train_summary.json").read_text())["held_out_loss_after"] is None


def test_a_warmup_longer_than_the_run_fails_before_the_model_loads_and_a_fitting_one_is_said(capsys, tiny_setup,
                                                                                              tmp_path):
    common = ["--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "rows.jsonl"), "--max-steps", "4"]
    code, stderr = run_cli(capsys, *common, "--warmup-steps", "5", "--out", str(tmp_path / "long"))
    assert code == 2 and stderr.splitlines()[-1] == ("error: --warmup-steps 5 is longer than the run (4 optimizer "
                                                     "steps): its learning rate would never reach --lr")
    assert not (tmp_path / "long").exists()
    assert train.main([*common, "--warmup-steps", "3", "--out", str(tmp_path / "fits")]) == 0
    assert "schedule: 4 optimizer steps, warmup 3 (--warmup-steps, as asked)" in capsys.readouterr().out
    assert json.loads((tmp_path / "fits" / "train_summary.json").read_text())["warmup_steps"] == 3


def test_bad_dataset_fails_with_one_clear_line(capsys, tiny_setup, tmp_path):
    code, stderr = run_cli(capsys, "--model", str(tiny_setup / "model"), "--dataset",
                           str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out"))
    assert code == 2 and stderr.startswith("error: dataset file not found")


def test_bad_target_modules_fail_cleanly(capsys, tiny_setup, tmp_path):
    code, stderr = run_cli(capsys, "--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "rows.jsonl"),
                           "--targets", "c_attn", "--out", str(tmp_path / "out"))
    assert code == 2 and "no linear layer of the model matches" in stderr


def test_a_rank_too_large_for_memory_is_refused_before_allocating(tiny_setup, tmp_path, capsys):
    out = tmp_path / "huge"
    code = train.main(["--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "rows.jsonl"),
                       "--out", str(out), "--rank", "10000000"])
    err = capsys.readouterr().err
    assert code == 2 and "--rank 10000000: the adapter's weights, gradients and AdamW state need" in err
    assert "Traceback" not in err and not out.exists()


def test_the_adapter_size_is_known_before_it_is_allocated():
    model = build_tiny_model("gemma3")
    config = LoRAConfig(rank=4, alpha=8.0)
    expected = lora_parameter_count(model, config)
    inject_lora(model, config)
    assert expected == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n) > 0
