"""Replay bad inputs and faults through the command lines, as a new user would meet them, and count
the outcomes: each must exit 2 with one readable line on stderr naming what is wrong (no traceback),
and leave the files it was given as they were. Cases that should succeed check what they printed.

    .venv/bin/python tests/replay_bad_inputs.py          # ~12 minutes here: each case is a fresh process
    .venv/bin/python tests/replay_bad_inputs.py resume serve   # only the cases whose name holds a word

It runs on a tiny random-init Gemma 3 saved in a temporary folder (the embedded model is never
loaded), so it measures the tools' handling of input, not the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


@dataclass
class Case:
    name: str
    argv: list[str]
    expect: str  # a piece of the one error line; or, with ok=True, of the output
    ok: bool = False  # the command should succeed
    keep: list[Path] = field(default_factory=list)  # files that must be left as they were
    setup: object = None  # callable run before the command


def fingerprint(paths: list[Path]) -> dict[str, str]:
    result = {}
    for path in paths:
        # .lock holds the pid of the last run that opened the folder: a lock, not data
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".lock") if path.is_dir() else [path]
        for file in files:
            result[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest() if file.exists() else "missing"
    return result


def run_case(case: Case) -> tuple[str, str]:
    """(verdict, detail): verdict is ok, traceback, silent (wrong exit code or message) or lost."""
    if case.setup:
        case.setup()
    before = fingerprint(case.keep)
    try:  # a bad input must be refused at once; only the few cases that succeed do real (tiny) work
        done = subprocess.run([sys.executable, *case.argv], cwd=ROOT, capture_output=True, text=True, timeout=180,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    except subprocess.TimeoutExpired:
        return "silent", "still running after 180 s (a bad input was accepted?)"
    err_lines = [line for line in done.stderr.splitlines() if line.strip()]
    last = err_lines[-1] if err_lines else ""
    if "Traceback" in done.stderr:
        return "traceback", last
    if fingerprint(case.keep) != before:
        return "lost", "a file it was given changed"
    if case.ok:
        good = done.returncode == 0 and case.expect in done.stdout + done.stderr
        return ("ok" if good else "silent"), f"exit {done.returncode}: {(done.stdout + done.stderr).strip()[-160:]}"
    good = done.returncode == 2 and case.expect in last and ("error" in last.lower())
    return ("ok" if good else "silent"), f"exit {done.returncode}: {last[:200]}"


def build_cases(tmp: Path) -> list[Case]:
    from conftest import build_tiny_model, corpus_row, make_tiny_tokenizer
    from lora import LoRAConfig, inject_lora, save_adapter

    model = tmp / "model"
    build_tiny_model("gemma3").save_pretrained(model)
    make_tiny_tokenizer().save_pretrained(model)
    tiny = build_tiny_model("gemma3")
    inject_lora(tiny, LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj",)))
    adapter = tmp / "adapter"
    save_adapter(tiny, adapter, LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj",)))
    rows = [corpus_row(index) for index in range(30)]
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    one_row = tmp / "one_row.jsonl"
    one_row.write_text(json.dumps(rows[0]) + "\n")
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    wrong_columns = tmp / "wrong.jsonl"
    wrong_columns.write_text('{"question": "x", "answer": "y"}\n')
    a_file = tmp / "a_file.txt"
    a_file.write_text("keep me\n")

    base = ["--model", str(model)]
    quick = [*base, "--dataset", str(data), "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1"]
    RESUME = ["--max-steps", "2", "--save-every", "1"]  # the settings of the finished run the resume cases damage

    def train(name: str, *extra: str, out: Path | None = None, **kw) -> Case:
        return Case(name, ["train.py", *quick, "--out", str(out or tmp / "runs" / name), *extra], **kw)

    finished = tmp / "runs" / "finished"

    def finished_run():  # a real finished run to damage or protect
        if not finished.exists():
            subprocess.run([sys.executable, "train.py", *quick, *RESUME, "--out", str(finished)], cwd=ROOT,
                           capture_output=True, check=True)

    def damaged(name: str, damage) -> Path:
        def make():
            finished_run()
            folder = tmp / "runs" / name
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(finished, folder)
            damage(folder)
        return make

    def checkpoint(folder: Path) -> Path:
        return sorted(folder.glob("checkpoint-*"))[-1]

    def adapter_with(config_change: dict, name: str) -> Path:
        folder = tmp / name
        shutil.copytree(adapter, folder, dirs_exist_ok=True)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **config_change}))
        return folder

    bad_r = adapter_with({"r": "sixteen"}, "adapter_bad_r")
    bad_targets = adapter_with({"target_modules": 5}, "adapter_bad_targets")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text('{"instruction": "Write fib"}\n')
    completions_dup = tmp / "dup.jsonl"
    completions_dup.write_text("".join(json.dumps({"task_id": "HumanEval/0", "completion": c}) + "\n" for c in
                                       ["    return False\n", "    return any(abs(a - b) < threshold for i, a in "
                                        "enumerate(numbers) for b in numbers[i + 1:])\n"]))
    outputs_full = tmp / "outputs_full"
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = str(busy.getsockname()[1])
    build_cases.busy = busy  # held open while the cases run

    evaluate = ["evaluate.py", *base, "--dataset", str(data), "--adapters", str(adapter), "--max-new-tokens", "4"]
    bench = [*base, "--dataset", str(data), "--variants", "lora", "--generate-prompts", "0"]
    samples = tmp / "samples"  # two models' per-sample files, scored on different items
    samples.mkdir()
    for name, tasks in [("one", ["held_out/0"]), ("two", ["held_out/1"])]:
        (samples / f"{name}.jsonl").write_text("".join(json.dumps({"task": task, "code": "x", "valid": True}) + "\n"
                                                       for task in tasks))
    cases = [
        # train.py: options out of range
        train("max-steps -1", "--max-steps", "-1", expect="--max-steps: must be >= 1"),
        train("max-steps 0", "--max-steps", "0", expect="--max-steps: must be >= 1"),
        train("epochs 0", "--epochs", "0", expect="--epochs: must be >= 1"),
        train("max-length 0", "--max-length", "0", expect="--max-length: must be >= 1"),
        train("max-length 5 (no row fits)", "--max-length", "5", expect="no training row fits --max-length 5"),
        train("grad-clip -1", "--grad-clip", "-1", expect="--grad-clip: must be > 0"),
        train("grad-clip 0", "--grad-clip", "0", expect="--grad-clip: must be > 0"),
        train("lr 0", "--lr", "0", expect="--lr: must be > 0"),
        train("lr inf", "--lr", "inf", expect="--lr"),
        train("rank 0", "--rank", "0", expect="--rank: must be >= 1"),
        train("rank 10000000", "--rank", "10000000", expect="--rank 10000000"),
        train("alpha -2", "--alpha", "-2", expect="--alpha: must be > 0"),
        train("dropout 1.5", "--dropout", "1.5", expect="--dropout"),
        train("batch-size 0", "--batch-size", "0", expect="--batch-size: must be >= 1"),
        train("grad-accum 0", "--grad-accum", "0", expect="--grad-accum: must be >= 1"),
        train("warmup-steps -1", "--warmup-steps", "-1", expect="--warmup-steps"),
        train("warmup-steps longer than the run", "--max-steps", "2", "--warmup-steps", "3",
              expect="--warmup-steps 3 is longer than the run (2 optimizer steps)"),
        train("weight-decay -1", "--weight-decay", "-1", expect="--weight-decay"),
        train("save-every 0", "--save-every", "0", expect="--save-every: must be >= 1"),
        train("eval-every 0", "--eval-every", "0", expect="--eval-every: must be >= 1"),
        train("eval-rows 0", "--eval-rows", "0", expect="--eval-rows: must be >= 1"),
        train("token-lr-scale 0", "--token-lr-scale", "0", expect="--token-lr-scale: must be > 0"),
        train("seed -1", "--seed", "-1", expect="--seed"),
        train("targets foo", "--targets", "foo", expect="no linear layer of the model matches"),
        train("trainable-tokens unknown", "--trainable-tokens", "<nope>", expect="not a single token"),
        train("trainable-tokens id too large", "--trainable-tokens", "999999", expect="999999"),
        train("device foo", "--device", "foo", expect="--device"),
        train("device cuda without one", "--device", "cuda", expect="--device"),
        train("device cuda:7", "--device", "cuda:7", expect="--device"),
        Case("model missing folder", ["train.py", "--model", str(tmp / "nowhere"), "--out", str(tmp / "r")],
             expect="neither a local model folder nor a model on the Hugging Face Hub"),
        Case("model unknown hub id", ["train.py", "--model", "no-such-org/no-such-model", "--out", str(tmp / "r")],
             expect="no-such-org/no-such-model"),
        Case("dataset missing", ["train.py", *base, "--dataset", str(tmp / "nope.jsonl"), "--out", str(tmp / "r")],
             expect="not found"),
        Case("dataset empty", ["train.py", *base, "--dataset", str(empty), "--out", str(tmp / "r")], expect="empty"),
        Case("dataset wrong columns", ["train.py", *base, "--dataset", str(wrong_columns), "--out", str(tmp / "r")],
             expect="instruction"),
        Case("dataset one row (trains; no held-out loss, said so)", ["train.py", *quick[:2], "--dataset", str(one_row),
                                                                   "--max-steps", "1", "--out", str(tmp / "one")],
             ok=True, expect="held-out loss not measured"),
        train("out is a file", out=a_file, expect="a_file.txt", keep=[a_file]),
        train("out under a file", out=a_file / "run", expect="a_file.txt", keep=[a_file]),
        # train.py: damaged or protected state
        train("resume: truncated trainer_state", *RESUME, out=tmp / "runs" / "torn_state", expect="trainer_state.safetensors",
              setup=damaged("torn_state", lambda f: (checkpoint(f) / "trainer_state.safetensors").write_bytes(
                  (checkpoint(f) / "trainer_state.safetensors").read_bytes()[:100])), keep=[tmp / "runs" / "torn_state"]),
        train("resume: state.json missing", *RESUME, out=tmp / "runs" / "no_state", expect="state.json",
              setup=damaged("no_state", lambda f: [(checkpoint(f) / "state.json").unlink(),
                                                    (f / "train_summary.json").unlink()]),
              keep=[tmp / "runs" / "no_state"]),
        train("resume: state.json half written", *RESUME, out=tmp / "runs" / "half_state", expect="state.json",
              setup=damaged("half_state", lambda f: (checkpoint(f) / "state.json").write_text('{"step": 2, "set')),
              keep=[tmp / "runs" / "half_state"]),
        train("metrics.jsonl damaged mid-file", *RESUME, out=tmp / "runs" / "bad_metrics",
              expect="metrics.jsonl line 2",
              setup=damaged("bad_metrics", lambda f: (f / "metrics.jsonl").write_text(
                  (f / "metrics.jsonl").read_text().replace("\n", "\n{oops\n", 1))),
              keep=[tmp / "runs" / "bad_metrics"]),
        train("adapter without checkpoint", out=tmp / "runs" / "no_ckpt", expect="--overwrite",
              setup=damaged("no_ckpt", lambda f: [shutil.rmtree(c) for c in f.glob("checkpoint-*")]),
              keep=[tmp / "runs" / "no_ckpt"]),
        train("changed settings on resume", *RESUME, "--lr", "0.1", out=tmp / "runs" / "changed",
              expect="--overwrite", setup=damaged("changed", lambda f: (f / "train_summary.json").unlink()),
              keep=[tmp / "runs" / "changed"]),
        # generate.py
        Case("generate max-new-tokens 0", ["generate.py", *base, "--prompt", "x", "--max-new-tokens", "0"],
             expect="--max-new-tokens: must be >= 1"),
        Case("generate batch-size 0", ["generate.py", *base, "--prompt", "x", "--batch-size", "0"],
             expect="--batch-size: must be >= 1"),
        Case("generate temperature -1", ["generate.py", *base, "--prompt", "x", "--temperature", "-1"],
             expect="--temperature"),
        Case("generate top-p 5", ["generate.py", *base, "--prompt", "x", "--top-p", "5"], expect="--top-p"),
        Case("generate top-p 0", ["generate.py", *base, "--prompt", "x", "--top-p", "0"], expect="--top-p"),
        Case("generate repetition-penalty 0", ["generate.py", *base, "--prompt", "x", "--repetition-penalty", "0"],
             expect="--repetition-penalty"),
        Case("generate no-repeat-ngram -1", ["generate.py", *base, "--prompt", "x", "--no-repeat-ngram", "-1"],
             expect="--no-repeat-ngram"),
        Case("generate adapter missing", ["generate.py", *base, "--adapter", str(tmp / "nope"), "--prompt", "x"],
             expect="nope"),
        Case("generate adapter r sixteen", ["generate.py", *base, "--adapter", str(bad_r), "--prompt", "x"],
             expect="adapter_config.json"),
        Case("generate adapter target_modules 5", ["generate.py", *base, "--adapter", str(bad_targets), "--prompt", "x"],
             expect="target_modules"),
        Case("generate output is a folder", ["generate.py", *base, "--input", str(prompts), "--output", str(tmp)],
             expect="is a folder"),
        Case("generate output under a file", ["generate.py", *base, "--input", str(prompts), "--output",
                                              str(a_file / "x.jsonl")], expect="a_file.txt", keep=[a_file]),
        Case("generate input missing", ["generate.py", *base, "--input", str(tmp / "nope.jsonl"), "--output",
                                        str(tmp / "o.jsonl")], expect="nope.jsonl"),
        Case("generate input not JSON", ["generate.py", *base, "--input", str(a_file), "--output", str(tmp / "o.jsonl")],
             expect="a_file.txt", keep=[a_file]),
        Case("generate device foo", ["generate.py", *base, "--prompt", "x", "--device", "foo"], expect="--device"),
        Case("generate no prompt at all", ["generate.py", *base], expect="error"),
        # evaluate.py
        Case("evaluate workers -1", [*evaluate, "--workers", "-1"], expect="--workers: must be >= 1"),
        Case("evaluate workers 0", [*evaluate, "--workers", "0"], expect="--workers: must be >= 1"),
        Case("evaluate timeout 0", [*evaluate, "--timeout", "0"], expect="--timeout: must be > 0"),
        Case("evaluate limit -1", [*evaluate, "--limit", "-1"], expect="--limit: must be >= 1"),
        Case("evaluate limit 0", [*evaluate, "--limit", "0"], expect="--limit: must be >= 1"),
        Case("evaluate batch-size 0", [*evaluate, "--batch-size", "0"], expect="--batch-size: must be >= 1"),
        Case("evaluate max-new-tokens 0", [*evaluate, "--max-new-tokens", "0"], expect="--max-new-tokens: must be >= 1"),
        Case("evaluate one-row dataset", ["evaluate.py", *base, "--dataset", str(one_row), "--skip-base",
                                          "--adapters", str(adapter), "--outputs", str(tmp / "eval_one")],
             expect="held-out"),
        Case("evaluate outputs is a file", [*evaluate, "--outputs", str(a_file)], expect="a_file.txt", keep=[a_file]),
        Case("evaluate adapters missing", [*evaluate[:-4], "--adapters", str(tmp / "nope")], expect="nope"),
        Case("evaluate adapter target_modules 5", [*evaluate[:-4], "--adapters", str(bad_targets)],
             expect="target_modules"),
        Case("evaluate completions duplicates (per problem)", ["evaluate.py", "--completions", str(completions_dup)],
             ok=True, expect="50.0% (2 samples, averaged per problem)"),
        Case("evaluate completions partial", ["evaluate.py", "--completions", str(completions_dup)], ok=True,
             expect="covers only 1 of the 164 problems"),
        Case("evaluate completions not JSON", ["evaluate.py", "--completions", str(a_file)], expect="a_file.txt",
             keep=[a_file]),
        Case("evaluate completions missing", ["evaluate.py", "--completions", str(tmp / "nope.jsonl")],
             expect="nope.jsonl"),
        Case("evaluate limit beside a full run", [*evaluate, "--outputs", str(outputs_full), "--limit", "1"], ok=True,
             expect="model_comparison_limit1", keep=[outputs_full / "model_comparison.md"],
             setup=lambda: (outputs_full.mkdir(exist_ok=True), (outputs_full / "model_comparison.md").write_text("full\n"))),
        # export
        Case("export into a path under a file", ["export.py", str(adapter), str(a_file / "merged"), *base],
             expect="a_file.txt", keep=[a_file]),
        Case("export into an existing folder", ["export.py", str(adapter), str(tmp), *base], expect="already exists"),
        Case("export adapter missing", ["export.py", str(tmp / "nope"), str(tmp / "merged"), *base], expect="nope"),
        Case("export adapter r sixteen", ["export.py", str(bad_r), str(tmp / "merged2"), *base],
             expect="adapter_config.json"),
        # average.py
        Case("average into an existing folder", ["average.py", str(adapter), str(adapter), "--out", str(tmp)],
             expect="already exists", keep=[adapter]),
        Case("average into a path under a file", ["average.py", str(adapter), str(adapter), "--out",
                                                  str(a_file / "avg")], expect="a_file.txt", keep=[a_file]),
        Case("average one adapter", ["average.py", str(adapter), "--out", str(tmp / "avg")], expect="at least two"),
        Case("average adapter missing", ["average.py", str(adapter), str(tmp / "nope"), "--out", str(tmp / "avg")],
             expect="nope"),
        Case("average adapter r sixteen", ["average.py", str(adapter), str(bad_r), "--out", str(tmp / "avg")],
             expect="adapter_config.json"),
        Case("average of an adapter with itself", ["average.py", str(adapter), str(adapter), "--out",
                                                   str(tmp / "avg")], ok=True, expect="average of 2 adapters"),
        # serve.py
        Case("serve port 70000", ["serve.py", *base, "--port", "70000"], expect="--port"),
        Case("serve port in use", ["serve.py", *base, "--port", busy_port, "--adapter", f"a={adapter}"],
             expect=busy_port),
        Case("serve adapter named base", ["serve.py", *base, "--adapter", f"base={adapter}", "--port", "0"],
             expect="other than 'base'"),
        Case("serve two adapters of one name", ["serve.py", *base, "--adapter", f"a={adapter}", "--adapter",
                                                f"a={adapter}", "--port", "0"], expect="its own name"),
        Case("serve adapter missing", ["serve.py", *base, "--adapter", f"a={tmp / 'nope'}", "--port", "0"],
             expect="nope"),
        Case("serve max-batch 0", ["serve.py", *base, "--max-batch", "0"], expect="--max-batch: must be >= 1"),
        Case("serve max-body-bytes 0", ["serve.py", *base, "--max-body-bytes", "0"],
             expect="--max-body-bytes: must be >= 1"),
        # sweep.py
        Case("sweep outputs is a file", ["sweep.py", *base, "--dataset", str(data), "--outputs", str(a_file)],
             expect="a_file.txt", keep=[a_file]),
        Case("sweep limit 0", ["sweep.py", *base, "--limit", "0"], expect="--limit: must be >= 1"),
        # python -m evaluation.paired_tests
        Case("paired tests samples missing", ["-m", "evaluation.paired_tests", "a", "b", "--samples", str(tmp / "nope")],
             expect="nope"),
        Case("paired tests on different items", ["-m", "evaluation.paired_tests", "one", "two", "--samples", str(samples)],
             expect="not scored on the same"),
        # the benchmarks
        Case("bench steps 0", ["-m", "bench", *bench, "--steps", "0"], expect="--steps: must be >= 1"),
        Case("bench warmup-steps -1", ["-m", "bench", *bench, "--warmup-steps", "-1"], expect="--warmup-steps"),
        Case("bench generate-prompts -1", ["-m", "bench", *bench, "--generate-prompts", "-1"],
             expect="--generate-prompts"),
        Case("bench variant unknown", ["-m", "bench", *bench, "--variants", "lora,foo"], expect="unknown variant"),
        Case("bench model missing folder", ["-m", "bench", "--model", str(tmp / "nowhere")], expect="nowhere"),
        Case("bench dataset missing", ["-m", "bench", *base, "--dataset", str(tmp / "nope.jsonl")], expect="nope.jsonl"),
        Case("bench output under a file", ["-m", "bench", *bench, "--output", str(a_file / "R.md")],
             expect="a_file.txt", keep=[a_file]),
        Case("bench max-length 5 (no step fits)", ["-m", "bench", *bench, "--max-length", "5", "--output",
                                                  str(tmp / "R.md")], expect="failed"),
        Case("bench batch sizes 0", ["-m", "bench.batch_size", *base, "--batch-sizes", "16,0"], expect="--batch-sizes"),
        Case("bench batch sizes adapter missing", ["-m", "bench.batch_size", *base, "--adapter", str(tmp / "nope")],
             expect="nope"),
        Case("bench batch sizes result under a file", ["-m", "bench.batch_size", *base, "--result", str(a_file / "r.json")],
             expect="is a file"),
        Case("bench head layout rows 0", ["-m", "bench.head_layout", *base, "--rows", "16,0"], expect="--rows"),
        Case("bench head layout result under a file", ["-m", "bench.head_layout", *base, "--result",
                                                       str(a_file / "r.json")], expect="is a file"),
        Case("bench serving clients x", ["-m", "bench.serving", *base, "--clients", "1,x"], expect="--clients"),
    ]
    return cases


def main(only: list[str]) -> int:
    """Every case, or those whose name contains one of `only`."""
    with tempfile.TemporaryDirectory() as folder:
        cases = [case for case in build_cases(Path(folder)) if not only or any(part in case.name for part in only)]
        counts: dict[str, int] = {}
        for case in cases:
            verdict, detail = run_case(case)
            counts[verdict] = counts.get(verdict, 0) + 1
            print(f"{verdict:9} {case.name}: {detail}", flush=True)
    print(f"{len(cases)} cases: " + ", ".join(f"{count} {verdict}" for verdict, count in sorted(counts.items())))
    return 0 if set(counts) == {"ok"} else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
