"""Generation with a tiny random model: batching, stop tokens, sampling, loop breakers, the CLI."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

import generate
from common import hardware
from conftest import build_tiny_model, make_tiny_tokenizer
from gemma import generation, loading
from gemma.generation import Completion, GenerationSettings, Generator
from lora import LoRAConfig, inject_lora, inject_trainable_tokens, load_adapter, save_adapter

# ---------------------------------------------------------------------------------------------
# Generation with a tiny random-init model


@pytest.fixture
def generator() -> Generator:
    return Generator(build_tiny_model("gemma3"), make_tiny_tokenizer())


PROMPTS = ["<start_of_turn>user\nWrite fib<end_of_turn>\n<start_of_turn>model\n", "def add(a, b):\n",
           "<start_of_turn>user\nSort a list of numbers in place, largest first<end_of_turn>\n<start_of_turn>model\n"]


def test_batched_left_padded_generation_matches_one_at_a_time(generator):
    settings = GenerationSettings(max_new_tokens=8)
    batched = generator.complete(PROMPTS, settings, batch_size=3)
    alone = [generator.complete([prompt], settings, batch_size=1)[0] for prompt in PROMPTS]
    assert batched == alone
    assert all(1 <= completion.new_tokens <= 8 for completion in batched)


def test_rows_that_end_leave_the_batch_and_the_rest_go_on_alone(generator):
    prompts = PROMPTS + ["def mul(a, b):\n", "class Stack:\n"]
    settings = GenerationSettings(max_new_tokens=12)
    answers = [generator._generate_ids(generator.tokenizer([prompt]).input_ids, settings, ())[0] for prompt in prompts]
    # Stop tokens that end the first four answers early but never occur in the last one, which then
    # goes on alone once the other four have ended (at most a quarter of the batch is left).
    generator.stop_ids = [next(token for token in answer[1:6] if token not in answers[-1]) for answer in answers[:-1]]
    batch_sizes = []
    generator.model.lm_head.register_forward_hook(lambda module, args, output: batch_sizes.append(output.shape[0]))
    together = generator.complete(prompts, settings, batch_size=len(prompts))
    assert batch_sizes[0] == 5 and batch_sizes[-1] == 1
    assert together[-1].new_tokens == 12 and all(completion.new_tokens < 12 for completion in together[:-1])
    alone = [generator.complete([prompt], settings, batch_size=1)[0] for prompt in prompts]
    assert together == alone


def test_a_row_whose_answer_holds_a_stop_string_has_ended(generator):
    ids = generator.tokenizer("a\ndef ", add_special_tokens=False).input_ids
    assert generator._finished(ids, ("\ndef ",)) and not generator._finished(ids, ("\nclass ",))
    assert generator._finished(ids[:1] + [generator.pad_id], ())


def test_the_head_computes_the_linear_s_logits_for_the_last_position_only(generator):
    head = generator.model.lm_head
    assert isinstance(head, generation.VocabularyMajorHead)
    calls = []
    head.register_forward_hook(lambda module, args, output: calls.append((args[0], output)))
    generator.complete(PROMPTS, GenerationSettings(max_new_tokens=4), batch_size=3)
    assert calls and {output.shape[1] for _, output in calls} == {1}
    prefill_input = calls[0][0]
    assert not prefill_input.is_contiguous()  # transformers' view of the batch, read in place
    with torch.inference_mode():
        for hidden, output in calls:
            torch.testing.assert_close(output, torch.nn.functional.linear(hidden, head.linear.weight))


def test_the_head_is_swapped_once_and_inside_a_trainable_token_head():
    model = build_tiny_model("gemma3")
    Generator(model, make_tiny_tokenizer())
    Generator(model, make_tiny_tokenizer())
    assert isinstance(model.lm_head.linear, torch.nn.Linear)
    with_rows = build_tiny_model("gemma3")
    inject_trainable_tokens(with_rows, [3, 5])
    hidden = torch.randn(2, 3, with_rows.config.hidden_size)
    with torch.no_grad():
        before = with_rows.lm_head(hidden)
        Generator(with_rows, make_tiny_tokenizer())
        assert type(with_rows.lm_head).__name__ == "TrainableTokenHead"
        assert isinstance(with_rows.lm_head.base_layer, generation.VocabularyMajorHead)
        torch.testing.assert_close(with_rows.lm_head(hidden), before)


def test_the_row_major_head_gives_nn_linear_s_logits_without_a_batched_product():
    model = build_tiny_model("gemma3").to(torch.bfloat16).requires_grad_(False)  # frozen, as Generator.load leaves it
    linear = model.lm_head
    head = generation.RowMajorHead(linear)
    batch = torch.randn(3, 5, linear.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(head(batch[:, -1:, :]), linear(batch[:, -1:, :].contiguous()), rtol=0, atol=0)
        with torch.profiler.profile() as profile:
            head(batch[:, -1:, :])  # the strided view of prefill
    # nn.Linear on that view takes a batched product that copies the weight for every row
    assert "aten::bmm" not in {event.name for event in profile.events()}


def test_the_head_is_chosen_by_device():
    model = build_tiny_model("gemma3").to(torch.bfloat16)
    Generator(model, make_tiny_tokenizer())
    assert isinstance(model.lm_head, generation.VocabularyMajorHead)  # on the CPU, in any dtype
    assert not generation._vocabulary_major_is_faster(torch.empty(2, 2, device="meta"))


def test_a_completion_ends_at_the_first_stop_token_and_records_it(generator):
    tokenizer = generator.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    ids = tokenizer("x = 1").input_ids[1:] + [end_of_turn, tokenizer.pad_token_id, tokenizer.pad_token_id]
    assert generator.to_completion(ids, ()) == Completion("x = 1", new_tokens=6, stop="<end_of_turn>")
    invented = tokenizer.convert_tokens_to_ids("<start_of_turn>")
    assert generator.to_completion(ids[:5] + [invented], ()).stop == "<start_of_turn>"
    assert generator.to_completion(ids[:5] + [tokenizer.eos_token_id], ()).stop == "<eos>"
    assert generator.to_completion(ids[:5], ()) == Completion("x = 1", new_tokens=5, stop=generation.STOPPED_AT_LIMIT)
    # A row stopped by a stop string is padded while the rest of its batch goes on.
    ids = tokenizer("a\ndef ").input_ids[1:]
    stopped = generator.to_completion(ids + [tokenizer.pad_token_id] * 4, ("\ndef ",))
    assert stopped == Completion("a", new_tokens=len(ids), stop=generation.STOPPED_BY_STRING)


def test_sampling_is_reproducible_with_a_seed(generator):
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    assert generator.complete(PROMPTS[:1], settings) == generator.complete(PROMPTS[:1], settings)


def test_repetition_penalty_discourages_tokens_already_seen(generator):
    greedy = generator.complete(PROMPTS[1:2], GenerationSettings(max_new_tokens=24))[0]
    penalised = generator.complete(PROMPTS[1:2], GenerationSettings(max_new_tokens=24, repetition_penalty=5.0))[0]
    prompt_tokens = set(generator.tokenizer(PROMPTS[1]).input_ids)

    def repeats(completion):  # new tokens that were already in the prompt or earlier in the answer
        ids = generator.tokenizer(completion.text, add_special_tokens=False).input_ids
        return sum(token in prompt_tokens or token in ids[:index] for index, token in enumerate(ids))

    assert repeats(penalised) < repeats(greedy)


def test_no_repeat_ngram_breaks_a_greedy_loop(generator, monkeypatch):
    generated = []  # token ids: the tiny byte-level tokenizer does not round-trip every answer's text
    to_completion = generator.to_completion
    monkeypatch.setattr(generator, "to_completion", lambda ids, *args: generated.append(ids) or to_completion(ids, *args))
    prompt_ids = generator.tokenizer(PROMPTS[1]).input_ids

    def repeated_trigrams(settings):  # over the prompt and the answer, as HF counts them
        generator.complete(PROMPTS[1:2], settings)
        ids = prompt_ids + generated[-1]
        trigrams = [tuple(ids[index:index + 3]) for index in range(len(ids) - 2)]
        return len(trigrams) - len(set(trigrams))

    assert repeated_trigrams(GenerationSettings(max_new_tokens=24)) > 0  # it loops, as small models do greedily
    assert repeated_trigrams(GenerationSettings(max_new_tokens=24, no_repeat_ngram=3)) == 0


def test_the_cache_key_names_the_penalty_only_when_it_is_on():
    assert "repetition_penalty" not in GenerationSettings().as_key()  # keys of older caches stay valid
    assert GenerationSettings(repetition_penalty=1.2).as_key()["repetition_penalty"] == 1.2
    assert "no_repeat_ngram" not in GenerationSettings().as_key()
    assert GenerationSettings(no_repeat_ngram=12).as_key()["no_repeat_ngram"] == 12


# ---------------------------------------------------------------------------------------------
# The command line, end to end on a saved tiny model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model("gemma3").save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, model_dir):
    """An adapter whose update is large enough to change what the model writes."""
    model = build_tiny_model("gemma3")
    config = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"),
                        base_model_name_or_path=str(model_dir))
    inject_lora(model, config)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 2.0)
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(model, folder, config)
    return folder


def run(argv, capsys) -> tuple[int, str, str]:
    code = generate.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prompt_prints_code(model_dir, capsys):
    code, out, _ = run(["--model", model_dir, "--prompt", "Write fib", "--max-new-tokens", 6], capsys)
    assert code == 0 and out.endswith("\n")


def test_batch_mode_writes_one_answer_per_line(model_dir, adapter_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": 1, "instruction": "Write fib"}\n\n{"id": 2, "prompt": "def add(a, b):\\n"}\n')
    answers = {}
    for name, extra in (("base", []), ("adapter", ["--adapter", adapter_dir])):
        output = tmp_path / f"{name}.jsonl"
        code, _, err = run(["--model", model_dir, "--input", prompts, "--output", output, "--max-new-tokens", 6,
                            "--batch-size", 2, *extra], capsys)
        assert code == 0 and "generated tokens/s" in err
        answers[name] = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["id"] for record in answers["base"]] == [1, 2]
    assert set(answers["base"][0]) >= {"instruction", "prompt", "response", "code", "new_tokens"}
    assert [r["response"] for r in answers["base"]] != [r["response"] for r in answers["adapter"]]


def test_on_a_terminal_the_answer_is_streamed(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    code, streamed, _ = run(["--model", model_dir, "--prompt", "Write fib", "--max-new-tokens", 6], capsys)
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    _, raw, _ = run(["--model", model_dir, "--prompt", "Write fib", "--max-new-tokens", 6, "--raw"], capsys)
    assert code == 0 and streamed.startswith(raw.rstrip("\n"))


def test_interactive_answers_until_an_empty_line(model_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Write fib\nWrite sort\n\n"))
    code, out, _ = run(["--model", model_dir, "--interactive", "--max-new-tokens", 4], capsys)
    assert code == 0 and out.count(">>> ") == 3


@pytest.mark.parametrize("problem, message", [
    ("missing-model", "neither a local model folder nor a model on the Hugging Face Hub"),
    ("missing-adapter", "adapter_config.json"),
    ("bad-input-line", "line 2: not valid JSON"),
    ("input-without-instruction", "needs an 'instruction' or a 'prompt'"),
    ("output-is-a-folder", "is a folder, not a file"),
    ("output-under-a-file", "cannot be created: "),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(problem, message, model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "x"}\n{oops\n' if problem == "bad-input-line" else '{"text": "x"}\n')
    output = tmp_path / "out.jsonl"
    argv = {
        "missing-model": ["--model", tmp_path / "nowhere", "--prompt", "x"],
        "missing-adapter": ["--model", model_dir, "--adapter", tmp_path, "--prompt", "x"],
        "output-is-a-folder": ["--model", "/not/loaded/first", "--input", prompts, "--output", tmp_path],
        "output-under-a-file": ["--model", "/not/loaded/first", "--input", prompts, "--output", prompts / "out.jsonl"],
    }.get(problem, ["--model", model_dir, "--input", prompts, "--output", output])
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("generate.py: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not output.exists()


def test_a_qlora_adapter_meets_the_nf4_base_it_was_trained_on(model_dir, adapter_dir, tmp_path):
    """On the CPU the NF4 weights are dequantized once for generation: the same decoder output, bit for bit,
    as bitsandbytes' 4-bit layers, and different from the full-precision base's."""
    from quant import NF4Linear

    qlora_adapter = tmp_path / "qlora"
    shutil.copytree(adapter_dir, qlora_adapter)
    (qlora_adapter / "train_config.json").write_text('{"qlora": true}')
    cpu = torch.device("cpu")
    nf4_model = loading.load_model(str(model_dir), cpu, hardware.pick_compute_dtype(cpu), nf4=True)
    load_adapter(nf4_model, qlora_adapter)
    assert any(isinstance(module, NF4Linear) for module in nf4_model.modules())
    input_ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    with torch.inference_mode():
        expected = nf4_model.model(input_ids).last_hidden_state  # the head is not NF4
        for folder, same in ((qlora_adapter, True), (adapter_dir, False)):
            loaded = Generator.load(str(model_dir), str(folder), device="cpu")
            assert not any(isinstance(module, NF4Linear) for module in loaded.model.modules())
            assert torch.equal(loaded.model.model(input_ids).last_hidden_state, expected) == same, folder
