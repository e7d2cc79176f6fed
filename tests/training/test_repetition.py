"""Pseudo-repetition training (training/repetition.py): the looping examples, and the DITTO loss and gradient
against a float64 reference built from the model's own logits."""

import json
import random

import pytest
import torch

from conftest import build_tiny_model, make_tiny_tokenizer
from data.dataset import IGNORE_INDEX, encode_example
from lora import LoRAConfig, inject_lora, inject_trainable_tokens
from test_train import adapter_tensors, assert_same_adapter, interrupt_at, tiny_config, tiny_setup  # noqa: F401
from training import loop, repetition
from training.setup import TrainError

ANSWER = "def f(x):\n    if x:\n        return 1\n    y = x + 1\n    return y"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def newline_ids(tokenizer):
    return repetition.newline_token_ids(tokenizer)


def test_newline_ids_are_the_tokens_that_hold_a_line_break(tokenizer, newline_ids):
    assert newline_ids == {tokenizer.convert_tokens_to_ids("Ċ")}  # the byte-level tokenizer's "\n"


def test_answer_lines_are_the_complete_lines_of_the_answer_only(tokenizer, newline_ids):
    example = encode_example(tokenizer, "Write f.\nIt adds one.", "", ANSWER)
    lines = [tokenizer.decode(example["input_ids"][start:stop]) for start, stop in
             repetition.answer_lines(example, newline_ids)]
    assert lines == ["def f(x):\n", "    if x:\n", "        return 1\n", "    y = x + 1\n"]  # not the prompt's


@pytest.mark.parametrize("seed", range(8))
def test_a_looping_example_repeats_a_block_of_whole_answer_lines_up_to_the_cap(tokenizer, newline_ids, seed):
    example = encode_example(tokenizer, "Write f.", "", ANSWER)
    made = repetition.looping_example(example, newline_ids, 120, random.Random(seed))
    ids, labels, size = made["input_ids"], made["labels"], made["block_length"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    block = ids[start:start + size]
    copies = (len(ids) - start) // size
    assert copies >= 2 and len(ids) == start + copies * size and len(ids) <= 120 < len(ids) + size
    assert ids[start:] == block * copies and labels[start:] == ids[start:]
    assert ids[:start + size] == example["input_ids"][:start + size]  # the answer as written, up to the block
    text = tokenizer.decode(block)
    assert text.endswith("\n") and 1 <= text.count("\n") <= repetition.MAX_BLOCK_LINES
    assert text in ANSWER + "\n"


def test_an_answer_without_a_block_that_fits_twice_gives_no_example(tokenizer, newline_ids):
    one_line = encode_example(tokenizer, "Write f.", "", "def f(): return 1")
    assert repetition.looping_example(one_line, newline_ids, 200, random.Random(0)) is None
    example = encode_example(tokenizer, "Write f.", "", ANSWER)
    (start, stop), *_ = repetition.answer_lines(example, newline_ids)
    too_short = stop + (stop - start) - 1  # the first line cannot be written twice, nor any later one
    assert repetition.looping_example(example, newline_ids, too_short, random.Random(0)) is None
    assert repetition.looping_example(example, newline_ids, too_short + 1, random.Random(0)) is not None
    three_times = too_short + 1 + (stop - start)  # with the loss from the third copy on, three copies must fit
    assert repetition.looping_example(example, newline_ids, three_times - 1, random.Random(0), 3) is None
    made = repetition.looping_example(example, newline_ids, three_times, random.Random(0), 3)
    assert made["penalized_from"] == 2 * made["block_length"]


def test_a_looping_batch_depends_only_on_its_seed(tokenizer, newline_ids):
    examples = [encode_example(tokenizer, f"Task {i}.", "", ANSWER.replace("1", str(i))) for i in range(6)]
    examples.append(encode_example(tokenizer, "Task.", "", "x = 1"))  # no block: skipped
    batches = [repetition.looping_batch(examples, newline_ids, 100, 4, seed, 0) for seed in ("a", "a", "b")]
    assert batches[0]["input_ids"].shape[0] == 4 and batches[0]["block_length"].shape == (4,)
    assert all(torch.equal(batches[0][key], batches[1][key]) for key in batches[0])
    assert not torch.equal(batches[0]["input_ids"], batches[2]["input_ids"])
    assert repetition.looping_batch(examples[-1:], newline_ids, 100, 4, "a", 0) is None


def reference_ditto(model, batch, first_copy: int) -> tuple[torch.Tensor, int]:
    """The paper's loss from the model's full logits in float64, p' detached, summed over copies first_copy, ..."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    targets = batch["labels"][:, 1:]
    probabilities = logits[:, :-1].softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    total, count = logits.new_zeros(()), 0
    for row in range(targets.shape[0]):
        labelled = (targets[row] != IGNORE_INDEX).nonzero().squeeze(1)
        size = int(batch["block_length"][row])
        for t in labelled[(first_copy - 1) * size:]:
            gap = probabilities[row, t] - repetition.LAMBDA * probabilities[row, t - size].detach()
            total = total - torch.log(1 - gap.abs())
            count += 1
    return total, count


@pytest.mark.parametrize("kind, first_copy", [("gemma2", 2), ("gemma3", 2), ("gemma3", 3)])
def test_the_ditto_loss_and_its_gradient_match_a_float64_reference(tokenizer, newline_ids, kind, first_copy):
    """LoRA and trainable token rows (reached through the tied head) both get DITTO's gradient."""
    model = build_tiny_model(kind).double()
    inject_lora(model, LoRAConfig(rank=4, dropout=0.0))
    inject_trainable_tokens(model, [4, 5])
    model.double()
    with torch.no_grad():  # LoRA's B starts at zero: give the update a direction
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    examples = [encode_example(tokenizer, f"Task {i}.", "", ANSWER.replace("1", str(i))) for i in range(3)]
    batch = repetition.looping_batch(examples, newline_ids, 90, 3, "test", tokenizer.pad_token_id, first_copy)
    trainable = [p for p in model.parameters() if p.requires_grad]

    ours, count = repetition.repetition_loss_sum(model, batch)
    ours_grads = torch.autograd.grad(ours, trainable)
    reference, reference_count = reference_ditto(model, batch, first_copy)
    reference_grads = torch.autograd.grad(reference, trainable)

    assert count == reference_count > 0
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    for mine, theirs in zip(ours_grads, reference_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-7, atol=1e-10)
    assert all(grad.abs().sum() > 0 for grad in ours_grads)


@pytest.fixture(scope="module")
def lines_dataset(tiny_setup):  # noqa: F811
    """Rows whose answers have several lines."""
    rows = [{"instruction": f"Return {i} squared.", "input": "",
             "output": f"def square_{i}():\n    y = {i}\n    y = y * y\n    return y"} for i in range(40)]
    path = tiny_setup / "lines.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_repetition_changes_training_is_recorded_and_leaves_the_main_loss_alone(tiny_setup, lines_dataset, tmp_path):  # noqa: F811
    """--repetition 1 trains another adapter and logs its own loss; step 1's cross-entropy is the plain run's."""
    runs = {name: tiny_config(tiny_setup, tmp_path / name, dataset=lines_dataset, **changes)
            for name, changes in (("plain", {}), ("ditto", {"repetition": 1.0}))}
    for config in runs.values():
        loop.run(config)
    plain, ditto = adapter_tensors(tmp_path / "plain"), adapter_tensors(tmp_path / "ditto")
    assert any(not torch.equal(plain[key], ditto[key]) for key in plain)
    assert json.loads((tmp_path / "ditto" / "train_config.json").read_text())["repetition"] == 1.0
    metrics = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in line] for name in runs}
    assert metrics["ditto"][0]["loss"] == metrics["plain"][0]["loss"]
    assert all(m["repetition_loss"] > 0 for m in metrics["ditto"])
    assert not any("repetition_loss" in m for m in metrics["plain"])


def test_an_interrupted_run_with_repetition_resumes_to_the_same_adapter(tiny_setup, lines_dataset, tmp_path):  # noqa: F811
    """The looping batches depend on the step, not on what ran before, and their dropout masks resume too."""
    def config(name):
        return tiny_config(tiny_setup, tmp_path / name, dataset=lines_dataset, repetition=1.0)
    loop.run(config("straight"))
    with pytest.raises(TrainError, match="checkpoint at step 3"):
        loop.run(config("interrupted"), after_step=interrupt_at(3))
    loop.run(config("interrupted"))
    assert_same_adapter(tmp_path / "straight", tmp_path / "interrupted")
