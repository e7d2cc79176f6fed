"""export.py --gguf: the GGUF file's metadata, vocabulary and weights, read back by the gguf package,
by transformers' GGUF loader and (when llama-cpp-python is installed: make gguf-check) by llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader, TokenType
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import AutoModelForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, PreTrainedTokenizerFast

import export
from conftest import make_tiny_tokenizer, tiny_gemma2_config, tiny_gemma3_config
from gemma.chat_format import CHAT_TEMPLATE, END_OF_TURN, conversation
from gguf_export import modelfile_text
from lora import LoRAConfig, inject_lora, inject_trainable_tokens, lora_layers, save_adapter

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PIECES = ["▁", "▁▁", "▁▁▁▁", *"abcdefghijklmnopqrstuvwxyz():=+\n", "de", "def", "▁a", "ad", "add", "▁x", "re", "ret",
          "retu", "retur", "return"]
MERGES = [("▁", "▁"), ("▁▁", "▁▁"), ("d", "e"), ("de", "f"), ("▁", "a"), ("a", "d"), ("ad", "d"), ("▁", "x"),
          ("r", "e"), ("re", "t"), ("ret", "u"), ("retu", "r"), ("retur", "n")]


def make_sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny tokenizer built the way Gemma's is: ▁ for spaces, BPE merges ranked like the pieces' ids,
    byte fallback, the special tokens at Gemma's ids (pad 0, eos 1, bos 2) and BOS added."""
    tokens = SPECIALS + [f"<0x{byte:02X}>" for byte in range(256)] + PIECES
    backend = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=MERGES,
                                   unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )


def build_model(kind: str, vocabulary_size: int) -> torch.nn.Module:
    """A tiny random Gemma whose attention llama.cpp computes as transformers does (query scale 1/sqrt(head_dim))."""
    config = tiny_gemma2_config() if kind == "gemma2" else tiny_gemma3_config()
    config.vocab_size, config.query_pre_attn_scalar = vocabulary_size, config.head_dim
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config) if kind == "gemma2" else Gemma3ForCausalLM(config)
    with torch.no_grad():  # norms away from 0, so that a norm written without Gemma's +1 would show
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(params=["gemma2", "gemma3"])
def exported(request, tmp_path):
    """(the adapter's merged model, its tokenizer, the export's folder) for a tiny Gemma 2 / Gemma 3 with a
    LoRA adapter and trained turn-marker rows, exported at f16 by the command line."""
    tokenizer = make_sentencepiece_tokenizer()
    model_dir, adapter_dir, out = tmp_path / "model", tmp_path / "adapter", tmp_path / "gguf"
    model = build_model(request.param, len(tokenizer))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = LoRAConfig(rank=2, alpha=4.0, dropout=0.0, trainable_token_indices=[4, 5])
    inject_lora(model, config)
    inject_trainable_tokens(model, config.trainable_token_indices)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.5, generator=generator)
        for name, parameter in model.named_parameters():
            if "trainable_tokens_delta" in name:
                parameter.normal_(std=1.0, generator=generator)
    save_adapter(model, adapter_dir, config)
    assert export.main([str(adapter_dir), str(out), "--model", str(model_dir), "--gguf"]) == 0
    return model, tokenizer, out


def test_the_file_holds_gemmas_metadata_vocabulary_and_norms(exported):
    model, tokenizer, out = exported
    reader = GGUFReader(out / "model-f16.gguf")
    field = {name: value.contents() for name, value in reader.fields.items()}
    arch = field["general.architecture"]
    config = model.config
    assert arch == {"gemma2": "gemma2", "gemma3_text": "gemma3"}[config.model_type]
    assert field[f"{arch}.block_count"] == config.num_hidden_layers
    assert field[f"{arch}.attention.sliding_window_pattern"] == [kind == "sliding_attention" for kind in config.layer_types]
    assert field["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert field["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert field["tokenizer.ggml.tokens"][:3] == ["<pad>", "<eos>", "<bos>"]
    kinds = field["tokenizer.ggml.token_type"]
    assert kinds[5] == TokenType.CONTROL and kinds[6] == TokenType.BYTE and kinds[263] == TokenType.USER_DEFINED
    assert field["tokenizer.ggml.tokens"][263] == "  "  # a run of spaces, as Gemma's own GGUF files hold it
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert "output.weight" not in tensors  # the head is the (tied) embedding
    norm = model.model.norm.weight.detach().numpy()
    np.testing.assert_allclose(tensors["output_norm.weight"].data, norm + 1, rtol=1e-6)  # Gemma's (1 + w)


def test_transformers_reads_back_the_merged_models_logits(exported):
    model, _, out = exported
    # transformers rebuilds a config from the GGUF keys, with its own defaults for what GGUF does not hold
    # (e.g. a query scale of 256 for a tiny head): the weights are what is checked here.
    reloaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", config=model.config,
                                                    dtype=torch.float32)
    ids = torch.tensor([[2, 4, 270, 290, 5, 300, 263, 40]])  # turn markers (trained rows), pieces, a byte
    with torch.no_grad():
        expected, got = model(ids).logits, reloaded(ids).logits
    # f16 weights: a relative error of about 2^-11 per weight.
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * expected.abs().max().item())


def test_the_modelfile_names_the_file_and_stops_at_the_end_of_a_turn(exported):
    _, _, out = exported
    text = (out / "Modelfile").read_text()
    assert text == modelfile_text("model-f16.gguf")
    lines = text.splitlines()
    assert "FROM ./model-f16.gguf" in lines and "PARAMETER stop <end_of_turn>" in lines
    assert (out / "FROM ./model-f16.gguf".removeprefix("FROM ./")).is_file()


def test_the_chat_template_writes_the_training_format():
    tokenizer = make_sentencepiece_tokenizer()
    chats = [[("user", "hi")], [("system", "Be brief."), ("user", "add")],
             [("user", "a "), ("assistant", "b\n"), ("system", "s1"), ("system", "s2"), ("user", "c")]]
    for chat in chats:
        messages = [{"role": role, "content": text} for role, text in chat]
        rendered = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                 add_generation_prompt=True)
        assert rendered == "<bos>" + conversation(chat)


def test_llama_cpp_answers_with_the_merged_models_greedy_tokens_and_ends_the_turn(exported):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp check: make gguf-check")
    model, tokenizer, out = exported
    prompt = "<start_of_turn>user\ndef add(x): return x<end_of_turn>\n<start_of_turn>model\n"
    ids = tokenizer(prompt)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(out / "model-f16.gguf"), n_ctx=128, n_threads=2, verbose=False)
    try:
        assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == ids
        answer = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            answer.append(token)
            if len(answer) == 24:
                break
    finally:
        llm.close()
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
    assert answer == expected


def test_llama_cpp_stops_at_the_end_of_turn_token(exported):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp check: make gguf-check")
    _, tokenizer, out = exported
    llm = llama_cpp.Llama(model_path=str(out / "model-f16.gguf"), n_ctx=64, n_threads=2, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        assert llama_cpp.llama_vocab_is_eog(vocab, end_of_turn)
        assert not llama_cpp.llama_vocab_is_eog(vocab, tokenizer.convert_tokens_to_ids("<start_of_turn>"))
    finally:
        llm.close()


@pytest.mark.parametrize("outtype", ["bf16", "q8_0"])
def test_other_outtypes_read_back_close_to_the_model(tmp_path, outtype):
    tokenizer = make_sentencepiece_tokenizer()
    model_dir, adapter_dir, out = tmp_path / "model", tmp_path / "adapter", tmp_path / "gguf"
    model = build_model("gemma3", len(tokenizer))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = LoRAConfig(rank=2, alpha=4.0, dropout=0.0)
    inject_lora(model, config)
    save_adapter(model, adapter_dir, config)
    assert export.main([str(adapter_dir), str(out), "--model", str(model_dir), "--gguf", "--outtype", outtype]) == 0
    reader = GGUFReader(out / f"model-{outtype}.gguf")
    kinds = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == outtype.upper() and kinds["output_norm.weight"] == "F32"
    reloaded = AutoModelForCausalLM.from_pretrained(out, gguf_file=f"model-{outtype}.gguf", config=model.config,
                                                    dtype=torch.float32)
    ids = torch.tensor([[2, 270, 290, 300]])
    with torch.no_grad():
        expected, got = model(ids).logits, reloaded(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-2 * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


@pytest.fixture
def plain_setup(tmp_path):
    tokenizer = make_sentencepiece_tokenizer()
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    model = build_model("gemma3", len(tokenizer))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = LoRAConfig(rank=2, alpha=4.0, dropout=0.0)
    inject_lora(model, config)
    save_adapter(model, adapter_dir, config)
    return model_dir, adapter_dir


def _refused(capsys, argv, tmp_path, message) -> None:
    before = sorted(path.name for path in tmp_path.iterdir())
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # no output, no staging folder left


def test_a_missing_or_damaged_adapter_is_refused(plain_setup, tmp_path, capsys):
    model_dir, adapter_dir = plain_setup
    _refused(capsys, [str(tmp_path / "nope"), str(tmp_path / "out"), "--model", str(model_dir), "--gguf"],
             tmp_path, "nope")
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    _refused(capsys, [str(adapter_dir), str(tmp_path / "out"), "--model", str(model_dir), "--gguf"], tmp_path,
             "adapter_model.safetensors")


def test_an_existing_output_is_refused(plain_setup, tmp_path, capsys):
    model_dir, adapter_dir = plain_setup
    (tmp_path / "out").mkdir()
    _refused(capsys, [str(adapter_dir), str(tmp_path / "out"), "--model", str(model_dir), "--gguf"], tmp_path,
             "already exists")


def test_an_unsupported_tokenizer_or_architecture_is_refused(plain_setup, tmp_path, capsys):
    model_dir, adapter_dir = plain_setup
    make_tiny_tokenizer().save_pretrained(model_dir)  # byte-level BPE, not SentencePiece
    _refused(capsys, [str(adapter_dir), str(tmp_path / "out"), "--model", str(model_dir), "--gguf"], tmp_path,
             "not a SentencePiece tokenizer")
    make_sentencepiece_tokenizer().save_pretrained(model_dir)
    config = (model_dir / "config.json").read_text()
    (model_dir / "config.json").write_text(config.replace('"query_pre_attn_scalar": 16', '"query_pre_attn_scalar": 64'))
    _refused(capsys, [str(adapter_dir), str(tmp_path / "out"), "--model", str(model_dir), "--gguf"], tmp_path,
             "query_pre_attn_scalar")


def test_an_unknown_outtype_is_refused_by_the_parser(plain_setup, tmp_path, capsys):
    model_dir, adapter_dir = plain_setup
    with pytest.raises(SystemExit) as stop:
        export.main([str(adapter_dir), str(tmp_path / "out"), "--model", str(model_dir), "--gguf", "--outtype", "q4_0"])
    assert stop.value.code == 2 and "invalid choice: 'q4_0'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The embedded model


def test_the_embedded_vocabulary_is_the_one_in_gemmas_own_gguf_file():
    """Rebuilt from the Hugging Face tokenizer, the vocabulary equals the one Gemma 3 270M's published GGUF
    holds: the same pieces and types, and scores in the same order (all llama.cpp uses them for)."""
    from gemma import loading
    from gguf_export.vocabulary import sentencepiece_vocabulary

    fields = GGUFReader(loading.embedded_gguf_file()).fields
    rebuilt = sentencepiece_vocabulary(loading.load_tokenizer(loading.EMBEDDED_MODEL))
    assert rebuilt.tokens == fields["tokenizer.ggml.tokens"].contents()
    assert rebuilt.types == fields["tokenizer.ggml.token_type"].contents()
    published = np.array(fields["tokenizer.ggml.scores"].contents())
    np.testing.assert_array_equal(np.argsort(-np.array(rebuilt.scores), kind="stable"),
                                  np.argsort(-published, kind="stable"))


def test_an_outtype_without_gguf_is_refused(plain_setup, tmp_path, capsys):
    model_dir, adapter_dir = plain_setup
    with pytest.raises(SystemExit) as stop:
        export.main([str(adapter_dir), str(tmp_path / "out"), "--model", str(model_dir), "--outtype", "q8_0"])
    assert stop.value.code == 2 and "--outtype applies to --gguf only" in capsys.readouterr().err
