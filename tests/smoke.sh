#!/usr/bin/env bash
# The README's own commands as a new user meets them: a virtualenv built from requirements.txt alone
# (no test or benchmark package can stand in for a missing runtime one) and an empty model cache (the
# embedded model is converted once, here, as on a fresh machine). Each command must exit 0 and leave
# its output. `make smoke` runs it; CI runs it before `make test`.
#
#   bash tests/smoke.sh            # everything in a new temporary folder, removed at the end
#   SMOKE_DIR=/tmp/s bash tests/smoke.sh   # keep the venv, cache and outputs there (reused if present)
set -euo pipefail
cd "$(dirname "$0")/.."

work="${SMOKE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gemma-lora-smoke.XXXXXX")}"
mkdir -p "$work"
make_pid=""
cleanup() {  # on any exit: a server left by a failed check is stopped, a temporary folder removed
    [[ -z "$make_pid" ]] || pkill -TERM -P "$make_pid" 2>/dev/null || true
    [[ -n "${SMOKE_DIR:-}" ]] || rm -rf "$work"
}
trap cleanup EXIT
venv="$work/venv"
outputs="$work/outputs"
export GEMMA_LORA_CACHE="$work/model-cache"
python="$venv/bin/python"
started=$SECONDS

step() { echo; echo "== smoke ($((SECONDS - started)) s): $*"; }
expect_file() { [[ -s "$1" ]] || { echo "smoke: FAILED: $2 did not write $1" >&2; exit 1; }; }

step "make venv (requirements.txt only)"
make --no-print-directory venv VENV="$venv"

step "make train MAX_STEPS=2 (converts the embedded model into an empty cache first)"
make --no-print-directory train VENV="$venv" MAX_STEPS=2 OUT="$outputs/lora_r16"
expect_file "$outputs/lora_r16/adapter_model.safetensors" "make train"

step "make qlora MAX_STEPS=2"
make --no-print-directory qlora VENV="$venv" MAX_STEPS=2 OUT="$outputs/qlora_r16"
expect_file "$outputs/qlora_r16/adapter_model.safetensors" "make qlora"

step "python generate.py --prompt ... --adapter"
"$python" generate.py --prompt "Write a function to calculate fibonacci numbers" \
    --adapter "$outputs/lora_r16" --max-new-tokens 24 >"$work/generated.txt"
expect_file "$work/generated.txt" "generate.py"
cat "$work/generated.txt"

step "make eval LIMIT=2 (base model and both adapters)"
make --no-print-directory eval VENV="$venv" LIMIT=2 OUTPUTS="$outputs"
expect_file "$outputs/model_comparison_limit2.md" "make eval"
cat "$outputs/model_comparison_limit2.md"

step "make pass-at-k LIMIT=2 SAMPLES=2 on HumanEval's raw prompts (the greedy answers from make eval's cache)"
make --no-print-directory pass-at-k VENV="$venv" LIMIT=2 SAMPLES=2 SAMPLE_TASKS=humaneval-raw OUTPUTS="$outputs"
expect_file "$outputs/pass_at_k_limit2.md" "make pass-at-k"
cat "$outputs/pass_at_k_limit2.md"

step "make serve: one chat request, then a clean stop"
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
make --no-print-directory serve VENV="$venv" OUTPUTS="$outputs" PORT="$port" &
make_pid=$!
"$python" - "$port" <<'EOF'
import json, sys, time, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 600
while True:  # the port opens before the models load; /health answers once they have
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as response:
            if json.load(response).get("status") == "ok":
                break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("smoke: FAILED: make serve did not become healthy in 10 minutes")
        time.sleep(2)
request = urllib.request.Request(base + "/v1/chat/completions", method="POST",
                                 headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "lora_r16", "max_tokens": 16, "messages": [
                                     {"role": "user", "content": "Write a function that adds two numbers."}]}).encode())
with urllib.request.urlopen(request, timeout=300) as response:
    answer = json.load(response)
print("served:", json.dumps(answer["choices"][0]["message"]["content"]))
EOF
server_pid="$(pgrep -P "$make_pid" -f serve.py)"
kill -TERM "$server_pid"
wait "$make_pid" || { echo "smoke: FAILED: make serve did not exit cleanly after SIGTERM (exit $?)" >&2; exit 1; }

step "python export.py ADAPTER OUT"
"$python" export.py "$outputs/lora_r16" "$work/merged"
expect_file "$work/merged/config.json" "export.py"

step "python export.py ADAPTER OUT --gguf"
"$python" export.py "$outputs/lora_r16" "$work/gguf" --gguf
expect_file "$work/gguf/model-f16.gguf" "export.py --gguf"
expect_file "$work/gguf/Modelfile" "export.py --gguf"

step "done: every command passed"
