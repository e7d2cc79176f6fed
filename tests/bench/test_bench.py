"""Smoke test of `make bench` on a tiny random Gemma 3: every variant trains, step 1's loss agrees
across variants (same function, same rows), and the command writes its report."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Gemma3TextConfig

from bench.__main__ import merged_report
from bench.measure import useful_step_flops
from bench.profile import (
    OTHER, bound_lines, kind_of, largest_other, largest_other_lines, profile_table, seconds_by_kind,
)
from bench.report import MatmulRate, Summary, target_lines, training_table
from bench.training import VARIANTS, BenchSettings, measure_variant, trainer_arguments
from common import hardware
from conftest import build_tiny_model, make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> BenchSettings:
    root = tmp_path_factory.mktemp("bench")
    build_tiny_model("gemma3").save_pretrained(root / "model")
    make_tiny_tokenizer().save_pretrained(root / "model")
    rows = [{"instruction": f"Return {i} squared.", "output": f"def square_{i}():\n    return {i} * {i}"}
            for i in range(60)]
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return BenchSettings(model=str(root / "model"), dataset=str(root / "rows.jsonl"), steps=1, warmup_steps=1,
                         max_length=128)


def test_all_variants_train_on_the_same_rows_and_agree_at_step_one(tiny_bench):
    results = {variant: measure_variant(variant, tiny_bench) for variant in VARIANTS}
    for result in results.values():
        assert len(result["step_seconds"]) == len(result["losses"]) == 2
        assert result["supervised_tokens"] == results["lora"]["supervised_tokens"]
        assert result["peak_training_bytes"] > 0
    # The LoRA B matrices start at zero: step 1 is the base model's loss, ours and PEFT's alike.
    assert results["lora"]["losses"][0] == pytest.approx(results["peft-lora"]["losses"][0], rel=1e-3)
    assert results["qlora"]["losses"][0] == pytest.approx(results["peft-qlora"]["losses"][0], rel=1e-2)
    for variant, plain in [("lora+compile", "lora"), ("lora+ckpt", "lora"), ("qlora+compile", "qlora"),
                           ("qlora+ckpt", "qlora"), ("peft-lora+compile", "peft-lora"), ("lora+nodrop", "lora"),
                           ("peft-lora+nodrop", "peft-lora")]:
        assert results[variant]["losses"][0] == pytest.approx(results[plain]["losses"][0], rel=1e-3), variant

    summaries = [Summary.of(result, warmup_steps=1) for result in results.values()]
    matmul = MatmulRate(1e12, 2048, "bfloat16")
    table = training_table(summaries, matmul)
    assert table.count("\n") == 1 + len(results) and "| 1.00x |" in table
    targets = target_lines(summaries, matmul)
    assert len(targets) == 6 and targets[1].startswith("- for comparison: our LoRA vs (3c)")
    assert targets[2].startswith("- for comparison: (1d) vs (3d)")
    assert len(target_lines([s for s in summaries if s.variant != "peft-lora+compile"], matmul)) == 5


def test_only_the_nodrop_variants_train_without_dropout(tiny_bench):
    for variant in VARIANTS:
        assert tiny_bench.train_config(variant).lora_config().dropout == (0.0 if variant.endswith("+nodrop") else 0.05)


def test_our_lora_against_peft_s_is_the_fastest_variant_with_dropout():
    def summary(variant: str, tokens_per_s: float) -> Summary:
        return Summary(variant, 1.0, tokens_per_s, 1e12, 1, 1, 2.0, 1.0)

    summaries = [summary("lora", 200.0), summary("lora+nodrop", 400.0), summary("peft-lora", 100.0),
                 summary("peft-lora+nodrop", 200.0)]
    targets = target_lines(summaries, MatmulRate(1e13, 2048, "float32"))
    assert targets[0] == "- NOT met: our LoRA ((1) ours, LoRA) >= 2.5x the tokens/s of (3): 2.00x"
    assert targets[1].startswith("- for comparison: (1d) vs (3d), both with LoRA dropout 0: 2.00x")


def test_the_compiled_peft_variant_flips_the_trainer_s_own_switch(tiny_bench, tmp_path):
    for variant, compiled in [("peft-lora", False), ("peft-lora+compile", True)]:
        config = tiny_bench.train_config(variant)
        assert trainer_arguments(config, 2, torch.device("cpu"), str(tmp_path)).torch_compile is compiled


def test_flop_model_matches_the_rule_of_thumb_for_gemma3_270m():
    # GUIDE: a training token of Gemma 3 270M costs about 4 x 268M FLOP (all positions supervised).
    config = Gemma3TextConfig(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256)
    per_token = useful_step_flops(config, rank=16, sequence_lengths=[1] * 1000, supervised_tokens=1000) / 1000
    assert per_token == pytest.approx(4 * 268e6, rel=0.02)
    # Without labels the head costs nothing: 4 x the 100,270,080 decoder linear weights, 6 x the
    # 1,474,560 LoRA weights, and 3 x the attention of a one-token sequence (4 x 1024 per layer).
    unlabelled = useful_step_flops(config, rank=16, sequence_lengths=[1], supervised_tokens=0)
    assert unlabelled == 4 * 100_270_080 + 6 * 1_474_560 + 3 * 18 * 4 * 1024


def test_make_bench_command_writes_its_report(tiny_bench, tmp_path):
    output = tmp_path / "RESULTS.md"
    command = [sys.executable, "-m", "bench", "--model", tiny_bench.model, "--dataset", tiny_bench.dataset,
               "--max-length", "128", "--variants", "lora", "--steps", "1", "--warmup-steps", "1",
               "--generate-prompts", "2", "--max-new-tokens", "4", "--output", str(output)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = output.read_text()
    # A CPU without native bf16 computes in float32 and keeps its own section.
    kind = "CPU" if hardware.pick_compute_dtype(torch.device("cpu")) == torch.bfloat16 else "CPU float32"
    assert f"## {kind} figures" in report and "| (1) ours, LoRA |" in report and "TFLOP/s" in report
    assert "one prompt at a time" in report and "python -m bench --model" in report


def test_a_run_replaces_its_own_section_and_keeps_the_other_device_s():
    report = merged_report("", "GPU", "## GPU figures\nold\n")
    report = merged_report(report, "CPU", "## CPU figures\ncpu\n")
    report = merged_report(report, "CPU profile", "## CPU profile figures\nprofile\n")
    report = merged_report(report, "CPU float32", "## CPU float32 figures\nfloat32\n")
    report = merged_report(report, "GPU", "## GPU figures\nnew\n")
    assert "cpu" in report and "profile" in report and "float32" in report and "new" in report and "old" not in report
    assert (report.index("## CPU figures") < report.index("## CPU float32 figures") < report.index("## CPU profile figures")
            < report.index("## GPU figures") < report.index("## How to read this"))
    assert merged_report(report, "CPU profile", "## CPU profile figures\nagain\n").count("## CPU profile") == 1


def test_operators_are_sorted_into_kinds_of_work():
    assert kind_of("aten::mm") == kind_of("aten::addmm") == kind_of("sm90_xmma_gemm_bf16bf16") \
        == "matmuls (linear layers, LoRA, LM head)"
    assert kind_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert kind_of("aten::_foreach_mul_") == kind_of("Optimizer.step#AdamW.step") == "optimizer (AdamW, clipping)"
    assert kind_of("aten::_to_copy") == kind_of("aten::copy_") == "copies and dtype casts"
    assert kind_of("aten::topk") == kind_of("aten::mul") == kind_of("autograd::engine::evaluate_function: MmBackward0") == OTHER
    totals = seconds_by_kind([("aten::mm", 2.0), ("aten::addmm", 1.0), ("aten::mul", 0.5)])
    assert totals["matmuls (linear layers, LoRA, LM head)"] == 3.0 and totals[OTHER] == 0.5
    assert totals["attention"] == 0.0 and len(totals) == 5
    operators = [("aten::mm", 9.0), ("aten::mul", 1.0), ("aten::tanh", 3.0), ("aten::add", 2.0)]
    assert largest_other(operators, steps=2, count=2) == [("aten::tanh", 1.5), ("aten::add", 1.0)]


def test_a_profiled_run_accounts_for_its_step_and_bounds_the_speedup(tiny_bench):
    settings = dataclasses.replace(tiny_bench, profile=True)
    results = [measure_variant(variant, settings) for variant in ("lora", "peft-lora")]
    for result in results:
        totals = seconds_by_kind(result["profile"])
        assert totals["matmuls (linear layers, LoRA, LM head)"] > 0 and totals["optimizer (AdamW, clipping)"] > 0
        assert result["profiled_steps"] == 1
        # The operators' self times cannot add up to more than the profiled step took (two threads at
        # most overlap: the autograd engine's and the caller's, which waits for it).
        assert 0 < sum(totals.values()) <= 2 * result["profiled_seconds"]
    table = profile_table(results)
    assert table.count("\n") == 2 + 5 and "| (1) ours, LoRA | (3) PEFT + HF Trainer, LoRA |" in table
    lines = bound_lines(results)
    assert len(lines) == 2 and "x PEFT's speed at most" in lines[1]
    assert bound_lines(results[:1]) == []
    named = largest_other_lines(results)
    assert len(named) == 2 and all(line.count("`") >= 2 for line in named)


def test_batch_size_bench_compares_sizes_on_the_same_prompts():
    from bench.batch_size import measure_batch_sizes
    from conftest import build_tiny_model, make_tiny_tokenizer
    from gemma.generation import GenerationSettings, Generator

    generator = Generator(build_tiny_model("gemma3"), make_tiny_tokenizer())
    prompts = ["def add(a, b):\n", "<start_of_turn>user\nWrite fib<end_of_turn>\n<start_of_turn>model\n", "x = "]
    results = measure_batch_sizes(generator, prompts, [1, 3], GenerationSettings(max_new_tokens=6), fixed_too=True)
    assert [(result["batch_size"], result["batches"]) for result in results] == [
        (1, "shrinking"), (1, "fixed"), (3, "shrinking"), (3, "fixed")]
    assert all(result["identical_to_first"] == 3 and result["prompts"] == 3 for result in results)
    assert all(result["new_tokens"] > 0 and result["tokens_per_s"] > 0 for result in results)


def test_serving_bench_counts_requests_and_batches():
    from bench.serving import markdown, measure
    from conftest import build_tiny_model, make_tiny_tokenizer
    from gemma.generation import Generator
    from lora.multi import AdapterSet
    from serving.models import ServedModel

    model = build_tiny_model("gemma3")
    models = {"base": ServedModel(Generator(model, make_tiny_tokenizer()), AdapterSet(model), 0)}
    results = measure(models, "base", ["Write fib", "Sort a list"], [1, 3], per_client=2, max_tokens=4,
                      max_batch=4)
    assert [(result["clients"], result["requests"]) for result in results] == [(1, 2), (3, 6)]
    assert results[0]["batches"] == 2 and results[1]["batches"] <= 6
    assert all(result["p95_s"] >= result["p50_s"] > 0 for result in results)
    assert "| 3 | dynamic | 6 |" in markdown(results)


def test_head_layout_bench_times_both_heads_on_the_same_answers():
    from bench.head_layout import measure_generation, measure_products
    from gemma.generation import GenerationSettings, Generator, RowMajorHead, VocabularyMajorHead

    generator = Generator(build_tiny_model("gemma3"), make_tiny_tokenizer())
    head = generator.model.get_output_embeddings()
    products = measure_products(head.weight.detach(), [1, 5], repeats=1)
    assert [product["rows"] for product in products] == [1, 5]
    assert all(product["max_abs_difference"] < 1e-5 and product["speed_up"] > 0 for product in products)
    hidden = torch.randn(2, 3, head.weight.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(RowMajorHead(head.linear)(hidden), head(hidden))
    prompts = ["def add(a, b):\n", "<start_of_turn>user\nWrite fib<end_of_turn>\n<start_of_turn>model\n", "x = "]
    results = measure_generation(generator, prompts, GenerationSettings(max_new_tokens=5), batch_size=3, rounds=1)
    assert [result["head"] for result in results] == ["row-major", "vocabulary-major"]
    assert all(result["identical_to_first"] == 3 and result["new_tokens"] > 0 for result in results)
    assert generator.model.get_output_embeddings() is head  # put back
    assert isinstance(head, VocabularyMajorHead)
