"""Numeric options are refused outside their real range while the arguments are parsed (exit code 2,
one line naming the option), in every command line."""

import argparse

import pytest
import torch

import evaluate
import generate
from common import hardware
from common.options import DEVICE, DROPOUT, PROBABILITY, ranged
from gemma import loading
from training.arguments import parse_args


def test_ranged_types_check_both_ends():
    assert PROBABILITY("1") == 1.0 and DROPOUT("0") == 0.0 and ranged(int, 1)("3") == 3
    for kind, text in [(PROBABILITY, "0"), (PROBABILITY, "1.5"), (DROPOUT, "1"), (DROPOUT, "-0.1"),
                       (ranged(int, 1), "0"), (ranged(int, 1), "2.5"), (ranged(float, 0), "inf")]:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


@pytest.mark.parametrize("parse, args, message", [
    (generate._parser().parse_args, ["--prompt", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
    (generate._parser().parse_args, ["--prompt", "x", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (generate._parser().parse_args, ["--prompt", "x", "--temperature", "-1"], "argument --temperature: must be >= 0"),
    (generate._parser().parse_args, ["--prompt", "x", "--top-p", "5"], "argument --top-p: must be in (0, 1]"),
    (evaluate._parser().parse_args, ["--workers", "-1"], "argument --workers: must be >= 1"),
    (evaluate._parser().parse_args, ["--timeout", "0"], "argument --timeout: must be > 0"),
    (evaluate._parser().parse_args, ["--limit", "-1"], "argument --limit: must be >= 1"),
    (evaluate._parser().parse_args, ["--device", "foo"], "argument --device: unknown device 'foo'"),
    (generate._parser().parse_args, ["--prompt", "x", "--device", "cuda:7"], "argument --device: device 'cuda:7'"),
    (parse_args, ["--device", "gpu"], "argument --device: unknown device 'gpu'"),
    (parse_args, ["--seed", str(2**70)], f"argument --seed: must be in [0, {2**32 - 1}], got {2**70}"),
    (generate._parser().parse_args, ["--prompt", "x", "--seed", "-1"], "argument --seed: must be in [0, "),
])
def test_out_of_range_options_exit_2_with_one_line(capsys, parse, args, message):
    with pytest.raises(SystemExit) as exit_:
        parse(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_devices_this_machine_has_pass():
    assert DEVICE("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="use cpu, cuda or cuda:N"):
        DEVICE("meta")


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (False, False, torch.float32),  # AVX2 only: torch emulates bf16 matmuls ~100x slower than float32
    (True, False, torch.bfloat16),
    (False, True, torch.bfloat16),
])
def test_the_cpu_computes_in_bf16_only_where_it_multiplies_bf16_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert hardware.pick_compute_dtype(cpu) == expected
    assert ("no native bf16" in hardware.describe_compute(cpu, expected)) == (expected == torch.float32)


@pytest.mark.parametrize("bf16, expected", [(False, torch.float32), (True, torch.bfloat16)], ids=["T4-V100", "A100-H200"])
def test_a_gpu_without_bf16_computes_in_float32_never_fp16(monkeypatch, bf16, expected):
    """fp16 overflows Gemma's activations: a GPU without bf16 trains in float32, by the same rule as the CPU."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    gpu = torch.device("cuda")
    assert hardware.pick_compute_dtype(gpu) == expected
    line = hardware.describe_compute(gpu, expected)
    assert ("this GPU has no bf16, and Gemma overflows in fp16" in line) == (expected == torch.float32)


@pytest.mark.parametrize("offline", [False, True])
@pytest.mark.parametrize("name, message", [
    ("/no/such/folder", "neither a local model folder nor a model on the Hugging Face Hub"),
    ("./models/missing", "neither a local model folder nor a model on the Hugging Face Hub"),
    ("a/b/c", "neither a local model folder nor a model on the Hugging Face Hub"),
])
def test_a_model_that_is_neither_a_folder_nor_a_hub_id_fails_at_once(name, message, offline, monkeypatch):
    """A path is never asked of the Hub, even with HF_HUB_OFFLINE set (then transformers' own error is
    about repo ids)."""
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(loading.ModelLoadError, match=message):
        loading.resolve_model_path(name)


def test_an_id_that_is_not_a_valid_hub_id_fails_at_once(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(loading.ModelLoadError, match="neither a local model folder nor a model on the Hugging Face Hub"):
        loading.resolve_model_path("no such id!")


def test_an_unreachable_hub_is_one_line_at_once_not_a_minute_of_retries(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    with pytest.raises(loading.ModelLoadError, match="the Hub cannot be reached: .*Name or service not known"):
        loading.resolve_model_path("nobody/no-such-model")
