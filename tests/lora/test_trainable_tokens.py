"""Trainable token rows (PEFT's trainable_token_indices): maths, training, files both ways, merge."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

from conftest import build_tiny_model, make_tiny_tokenizer, tiny_gemma3_config
from data.dataset import collate
from gemma.generation import GenerationSettings, Generator
from lora import (
    LoRAConfig, export_merged, inject_lora, inject_trainable_tokens, load_adapter, lora_layers, merge_token_rows,
    save_adapter, token_rows,
)
from training.config import TrainConfig
from training.loss import supervised_loss_sum
from training.optimizer import make_optimizer, set_learning_rate
from training.setup import TrainError, resolve_trainable_tokens
from training.step import optimizer_step

TOKEN_IDS = (4, 5)  # <start_of_turn>, <end_of_turn> in the tiny tokenizer
IDS = torch.tensor([[2, 4, 10, 40, 5, 77, 4, 120, 5, 9]])
ROWS_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def build(kind: str, tied: bool = True) -> torch.nn.Module:
    if tied:
        return build_tiny_model(kind)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(tiny_gemma3_config().__class__(**{**tiny_gemma3_config().to_dict(),
                                                               "tie_word_embeddings": False})).eval()


def with_adapter(kind: str, tied: bool = True, seed: int = 1) -> torch.nn.Module:
    """LoRA r=4 on q/k/v/o plus rows for TOKEN_IDS, all set to random values as after training."""
    model = build(kind, tied)
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    inject_trainable_tokens(model, TOKEN_IDS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def config(tied_ids=TOKEN_IDS) -> LoRAConfig:
    return LoRAConfig(rank=4, alpha=8.0, dropout=0.0, base_model_name_or_path="tiny", trainable_token_indices=tied_ids)


@pytest.fixture(params=["gemma2", "gemma3"])
def kind(request):
    return request.param


# ------------------------------------------------------------------ maths

def test_fresh_rows_change_nothing(kind):
    model = build(kind)
    expected = logits(model)
    inject_trainable_tokens(model, TOKEN_IDS)
    # Equal up to float32 rounding: the rows' logits come from their own (smaller) matrix product.
    torch.testing.assert_close(logits(model), expected, rtol=1e-6, atol=1e-6)


def test_tied_head_uses_the_rows_and_an_untied_head_is_left_alone():
    tied = with_adapter("gemma3")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight and type(tied.lm_head).__name__ == "TrainableTokenHead"
    untied = with_adapter("gemma3", tied=False)
    assert isinstance(untied.lm_head, torch.nn.Linear)


def batch_with(input_ids: list[int], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([input_ids]), "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long),
            "labels": torch.tensor([labels])}


def test_our_loss_and_gradients_equal_autograd_through_the_wrapped_model(kind):
    model = with_adapter(kind)
    labels = [-100, -100, -100, 40, 5, 77, 4, 120, 5, -100]
    batch = batch_with(IDS[0].tolist(), labels)
    ours = supervised_loss_sum(model, batch) / 6
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference = model(**batch).loss  # transformers' loss through our embedding and head wrappers
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(ours_grads[name], parameter.grad, rtol=1e-4, atol=1e-6)


def rows_gradient(model, batch) -> torch.Tensor:
    model.zero_grad()
    supervised_loss_sum(model, batch).backward()
    return token_rows(model)[1].trainable_tokens_delta.grad


def test_the_gradient_reaches_the_rows_through_the_input_and_through_the_tied_head(kind):
    model = with_adapter(kind)
    through_input = rows_gradient(model, batch_with([2, 4, 10, 11, 12], [-100, -100, 10, 11, 12]))
    assert through_input[0].abs().sum() > 0  # id 4 is read, never predicted
    through_head = rows_gradient(model, batch_with([2, 10, 11, 12], [-100, 11, 12, 5]))
    assert through_head[1].abs().sum() > 0  # id 5 is predicted, never read
    untied = with_adapter("gemma3", tied=False)
    assert rows_gradient(untied, batch_with([2, 10, 11, 12], [-100, 11, 12, 5])).abs().sum() == 0


def test_training_changes_only_the_chosen_rows(kind):
    tokenizer = make_tiny_tokenizer()
    model = build(kind)
    original = model.get_input_embeddings().weight.detach().clone()
    inject_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    inject_trainable_tokens(model, TOKEN_IDS)
    settings = TrainConfig(lr=1e-2, token_lr_scale=2.0)
    parameters, optimizer = make_optimizer(model, settings)
    assert [group["lr_scale"] for group in optimizer.param_groups] == [1.0, 2.0]
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    set_learning_rate(optimizer, 1e-2)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(2e-2)
    text = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nok<end_of_turn>"
    ids = tokenizer(text).input_ids
    batch = collate([{"input_ids": ids, "labels": ids}], tokenizer.pad_token_id)
    for _ in range(3):
        optimizer_step(model, parameters, optimizer, [batch], torch.device("cpu"), torch.float32, 1.0)
    assert torch.equal(model.get_input_embeddings().weight, original), "the base table stays frozen"
    merge_token_rows(model)
    changed = (model.get_input_embeddings().weight != original).any(dim=1).nonzero().flatten().tolist()
    assert changed == list(TOKEN_IDS)


# ------------------------------------------------------------------ files, both ways

def test_file_layout_and_config_are_peft_s(kind, tmp_path):
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                  trainable_token_indices=list(TOKEN_IDS))
    peft.get_peft_model(build(kind), peft_config).save_pretrained(tmp_path / "peft")
    model = with_adapter(kind)
    save_adapter(model, tmp_path / "ours", config())
    theirs, ours = load_file(tmp_path / "peft/adapter_model.safetensors"), load_file(tmp_path / "ours/adapter_model.safetensors")
    assert ROWS_KEY in theirs and ROWS_KEY in ours
    assert ours[ROWS_KEY].shape == theirs[ROWS_KEY].shape == (2, 64)
    assert not any("lm_head" in key for key in [*theirs, *ours]), "a tied head's rows are stored once"
    their_config = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert our_config["trainable_token_indices"] == their_config["trainable_token_indices"] == list(TOKEN_IDS)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_peft_loads_our_rows_with_identical_logits(kind, tied, tmp_path):
    if not tied and kind == "gemma2":
        pytest.skip("one untied architecture is enough")
    model = with_adapter(kind, tied)
    save_adapter(model, tmp_path / "ours", config())
    reference = peft.PeftModel.from_pretrained(build(kind, tied), tmp_path / "ours")
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    assert (logits(model) - logits(build(kind, tied))).abs().max() > 0.1, "the adapter changes the output"


def test_we_load_peft_s_rows_with_identical_logits(kind, tmp_path):
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                  trainable_token_indices=list(TOKEN_IDS), init_lora_weights=False)
    peft_model = peft.get_peft_model(build(kind), peft_config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = build(kind)
    loaded = load_adapter(ours, tmp_path / "peft")
    assert loaded.trainable_token_indices == TOKEN_IDS
    # Relative too: the rows' logits reach ~60 here, where float32 sums in another order differ by ~1e-5.
    torch.testing.assert_close(logits(ours), logits(peft_model), rtol=1e-5, atol=1e-5)


def test_our_merge_equals_peft_s_merge_and_unload(kind, tmp_path):
    model = with_adapter(kind)
    save_adapter(model, tmp_path / "ours", config())
    merged_by_peft = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours").merge_and_unload()
    export_merged(model, make_tiny_tokenizer(), tmp_path / "merged", torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    for name, theirs in merged_by_peft.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], theirs, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(logits(reloaded), logits(merged_by_peft), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value, message", [
    ({"lm_head": [4]}, "only embed_tokens"), ([4, "x"], "list of token ids"), ("4,5", "list of token ids"),
])
def test_unsupported_token_configs_are_refused(kind, tmp_path, value, message):
    save_adapter(with_adapter(kind), tmp_path / "ours", config())
    raw = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    (tmp_path / "ours/adapter_config.json").write_text(json.dumps({**raw, "trainable_token_indices": value}))
    with pytest.raises(ValueError, match=message):
        load_adapter(build(kind), tmp_path / "ours")


def test_generation_uses_the_rows(tmp_path):
    model = with_adapter("gemma3")
    # Make <end_of_turn> the head's certain choice: its row points along every hidden state's mean.
    with torch.no_grad():
        hidden = model.model(IDS).last_hidden_state[0]
        token_rows(model)[1].trainable_tokens_delta[1] = hidden.mean(0) / hidden.mean(0).norm() * 1e3
    generator = Generator(model, make_tiny_tokenizer())
    completion = generator.complete(["<bos>hello"], GenerationSettings(max_new_tokens=8))[0]
    assert completion.new_tokens == 1 and completion.text == ""


# ------------------------------------------------------------------ train.py's choice of rows

def test_trainable_tokens_option_resolves_names_and_ids():
    tokenizer = make_tiny_tokenizer()
    assert resolve_trainable_tokens("auto", tokenizer) == TOKEN_IDS
    assert resolve_trainable_tokens("none", tokenizer) == ()
    assert resolve_trainable_tokens("<eos>, 7", tokenizer) == (1, 7)
    with pytest.raises(TrainError, match="not a single token"):
        resolve_trainable_tokens("<no_such_token>", tokenizer)
    with pytest.raises(TrainError, match="outside the vocabulary"):
        resolve_trainable_tokens("99999", tokenizer)
    with pytest.raises(TrainError, match="twice"):
        resolve_trainable_tokens("5,<end_of_turn>", tokenizer)


def test_loaded_adapter_has_rows_and_lora(kind, tmp_path):
    model = with_adapter(kind)
    save_adapter(model, tmp_path / "ours", config())
    fresh = build(kind)
    load_adapter(fresh, tmp_path / "ours")
    assert len(lora_layers(fresh)) == len(lora_layers(model)) and token_rows(fresh) is not None
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
