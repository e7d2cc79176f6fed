"""Checkpoints that resume a training run bit for bit: the adapter, AdamW's state,
the Python / torch / CUDA random states, the step, the run's settings and a data fingerprint; and
the choice, at start, between resuming from an output folder and starting it afresh.

    out/checkpoint-000025/  adapter_model.safetensors, adapter_config.json (PEFT layout),
                            trainer_state.safetensors (optimizer tensors, torch RNG states),
                            state.json (step, settings, optimizer groups, Python RNG)

Safetensors and JSON only (no pickle). A checkpoint is written into a temporary folder and renamed
when complete, so a crash never leaves one that looks finished; only the latest is kept.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.files import atomic_write, first_line, write_folder
from lora import LoRAConfig, save_adapter
from lora.adapter import WEIGHTS_NAME, AdapterError, load_adapter_tensors, read_adapter_weights

STATE_KEYS = ("step", "config", "data_fingerprint", "optimizer_param_groups", "python_rng")
# Settings that may change between a run and its resumption without changing what is trained (compile
# and gradient checkpointing change speed and memory, and the float rounding at most: the compiled layers
# draw the same dropout masks, train_setup.apply_speed_options).
RESUMABLE_CHANGES = {"out", "save_every", "eval_every", "overwrite", "device", "compile", "gradient_checkpointing",
                     "report_to"}
# Settings recorded since a later version, with the value that a checkpoint written before implies.
ADDED_SETTINGS = {"world_size": 1}
# Recorded since a later version and following from settings that are compared anyway (the schedule's length
# from the data, --epochs and --max-steps): a checkpoint written before implies whatever this run has.
DERIVED_SETTINGS = {"schedule_steps"}


class CheckpointError(RuntimeError):
    """A run cannot resume from its output folder; the message is one line for the user."""


@contextmanager
def hold_output_folder(out: Path) -> Iterator[None]:
    """Create `out` if needed and hold its lock (`out/.lock`, with our pid) while the run lasts: a
    second run on the same folder fails at once instead of mixing its files with ours. The lock
    goes with the process, however it ends; a folder we created and left empty is removed again."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"--out {out} cannot be a folder: {error.strerror or error}") from None
    lock = out / ".lock"
    handle = lock.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise CheckpointError(f"{out} is in use by another training run (pid {holder}); wait for it to end, "
                              "or choose another --out") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    finally:
        if created and [path.name for path in out.iterdir()] == [lock.name]:  # a start that failed early
            lock.unlink()
            out.rmdir()
        handle.close()


def data_fingerprint(examples: list[dict], schedule: list[list[int]]) -> str:
    """Identifies the tokenized rows and their order, so a resume on other data is refused."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(str(example["input_ids"]).encode())
    digest.update(str(schedule).encode())
    return digest.hexdigest()[:16]


def start_or_resume(out: Path, settings: dict, fingerprint: str, model, optimizer, overwrite: bool,
                    rank: int = 0) -> int:
    """Resume from the latest checkpoint in `out`, a folder held by hold_output_folder (state and this
    rank's RNG restored; returns its step), or return 0 for a fresh start: with `overwrite`, older
    checkpoints are removed first (by rank 0; the other ranks of a torchrun only read)."""
    existing = checkpoint_dirs(out)
    if existing and overwrite:
        if rank == 0:
            for directory in existing:
                shutil.rmtree(directory)
        existing = []
    if not existing and (out / WEIGHTS_NAME).exists() and not overwrite:
        raise CheckpointError(f"{out} holds an adapter but no checkpoint to resume from; use --overwrite to "
                              "replace it, or another --out")
    if not existing:
        return 0
    latest = existing[-1]
    saved = _read_state(latest)
    _check_resumable(saved["config"], settings, out)
    if saved["data_fingerprint"] != fingerprint:
        raise CheckpointError(f"the data differs from the run in {out}; use --overwrite to start over, or another --out")
    step, rng = load_checkpoint(latest, model, optimizer, rank)
    restore_rng_state(rng)
    if rank == 0:
        print(f"resuming from {latest.name} (step {step})")
    return step


def _check_resumable(saved: dict, current: dict, directory: Path) -> None:
    changed = [key for key in current if key not in RESUMABLE_CHANGES
               and not (key in DERIVED_SETTINGS and key not in saved)
               and saved.get(key, ADDED_SETTINGS.get(key)) != current[key]]
    if changed:
        key = changed[0]
        raise CheckpointError(
            f"{directory} was started with {key}={saved.get(key, ADDED_SETTINGS.get(key))!r}, now {key}={current[key]!r}; "
            "use --overwrite to start over, or another --out"
        )


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(out: Path) -> list[Path]:
    """Completed checkpoints, oldest first. A checkpoint is written under a temporary name and renamed
    when complete, so a half-written one never matches this pattern."""
    return sorted(out.glob("checkpoint-[0-9][0-9][0-9][0-9][0-9][0-9]"))


def save_checkpoint(out: Path, step: int, model, optimizer, rngs: list[dict], config: dict,
                    lora: LoRAConfig, fingerprint: str) -> None:
    """Write `out/checkpoint-<step>` and remove older ones; `rngs` holds each rank's random state (one
    without torchrun), `config` the run's settings (for the resume check), `fingerprint` its data and order."""
    tensors, groups = _flatten_optimizer_state(optimizer.state_dict())
    state = {
        "step": step, "config": config, "data_fingerprint": fingerprint,
        "optimizer_param_groups": groups,
    }
    for rank, rng in enumerate(rngs):
        prefix, python_key = _rng_names(rank)
        tensors[f"{prefix}torch"] = rng["torch"]
        for index, cuda_state in enumerate(rng.get("cuda", [])):
            tensors[f"{prefix}cuda.{index}"] = cuda_state
        state[python_key] = _python_rng_to_json(rng["python"])

    def write(staging: Path) -> None:
        save_adapter(model, staging, lora)
        atomic_write(staging / "trainer_state.safetensors", lambda path: save_file(tensors, path))
        atomic_write(staging / "state.json", lambda path: Path(path).write_text(json.dumps(state, indent=1)))

    write_folder(out / f"checkpoint-{step:06d}", write, "checkpoint", replace=True)
    for older in checkpoint_dirs(out)[:-1]:
        shutil.rmtree(older)


def load_checkpoint(directory: Path, model, optimizer, rank: int = 0) -> tuple[int, dict]:
    """Restore adapter and optimizer in place; return (step, this rank's RNG state to restore)."""
    state = _read_state(directory)
    try:
        load_adapter_tensors(model, read_adapter_weights(directory), str(directory))
    except AdapterError as error:
        raise _damaged(directory, error, WEIGHTS_NAME) from None
    try:
        tensors = load_file(directory / "trainer_state.safetensors")
        optimizer.load_state_dict(_unflatten_optimizer_state(tensors, state["optimizer_param_groups"]))
    except (OSError, SafetensorError, KeyError, ValueError) as error:
        raise _damaged(directory, error, "trainer_state.safetensors") from None
    prefix, python_key = _rng_names(rank)
    try:
        rng = {"python": _python_rng_from_json(state[python_key]), "torch": tensors[f"{prefix}torch"]}
    except KeyError as error:
        raise _damaged(directory, error, "trainer_state.safetensors") from None
    cuda_states = [tensors[key] for key in sorted(tensors) if key.startswith(f"{prefix}cuda.")]
    if cuda_states:
        rng["cuda"] = cuda_states
    return state["step"], rng


def _rng_names(rank: int) -> tuple[str, str]:
    """(prefix of a rank's RNG tensors, key of its Python RNG state). Rank 0 keeps the single-process
    names (rng.torch, python_rng), so those checkpoints read as before."""
    return ("rng.", "python_rng") if rank == 0 else (f"rng{rank}.", f"python_rng{rank}")


def _read_state(directory: Path) -> dict:
    try:
        state = json.loads((directory / "state.json").read_text())
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise KeyError(f"state.json has no {missing[0]!r}")
        return state
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _damaged(directory, error, "state.json") from None


def _damaged(directory: Path, error: Exception, file: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {directory} is damaged: {file}: {first_line(error)}; delete the checkpoint to "
                           "resume from an older one, or use --overwrite to start over")


def _flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for index, per_parameter in state_dict["state"].items():
        for name, value in per_parameter.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
