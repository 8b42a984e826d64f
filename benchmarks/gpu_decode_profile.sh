#!/usr/bin/env bash
# On a lent 1-GPU NVIDIA host (docs/benchmarks.md, "reap bench on one H200"): where a batch-1 decode step of the
# 4-layer 212B-width slice (W4A16, RTN) goes, by vLLM's own torch profiler, and `benchmarks/eval_speed.py`
# (reap eval's settings vs lm-eval's defaults) against the same server. Also, first, one block of the 212B width
# under `expert_tuning: stacked` (gpu_block_profile.sh), while the GPU is otherwise idle.
# Meant to run in the background (setsid) while the vLLM wheels are uploaded (../shared/gpu/stage-wheels.sh):
#   SHA=<bundle sha256> setsid nohup bash benchmarks/gpu_decode_profile.sh > ~/res/job.log 2>&1 &
# Needs .whl/ (auto-round, transformers 5.19, pydantic, lm-eval and their small dependencies) and, later,
# ~/stage/part_* (the vLLM 0.24.0 wheels). Small results in ~/res; `~/res/done` when finished. .whl/ is made on
# the CPU machine (git-ignored; ~30 MB, carried by the device call that starts this script):
#   pip download -d .whl --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 auto-round==0.16.1 transformers==5.19.0 \
#     datasets==5.2.0 multiprocess dill pydantic==2.14.4 pydantic-core annotated-types typing-inspection loguru \
#     lm-eval==0.4.13 evaluate pytablewriter DataProperty mbstrdecoder pathvalidate tabledata tcolorpy typepy \
#     chardet nltk more_itertools
#   pip wheel -w .whl --no-deps sqlitedict rouge-score word2number      # sdists only: built here (pure Python)
set -uo pipefail
SRC=$PWD WORK=${WORK:-/root/reap-decode} RES=${RES:-/root/res} PORT=${PORT:-8100}
export PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
mkdir -p "$WORK" "$RES"
step() { echo "[$(date +%T)] $*"; }

step "wheels of .whl: AutoRound + transformers 5.19 (build), lm-eval + pydantic (serve, eval)"
python3 -m pip install -q --no-index --no-deps --no-compile --target ~/tf519 "$SRC"/.whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-compile --target ~/lmx \
  $(ls "$SRC"/.whl/*.whl | grep -v -e transformers- -e auto_round-)

step "one block, expert_tuning stacked, iters 200"
PYTHONPATH=~/tf519 WHEELS=none PATHS=stacked ITERS=200 OUT="$RES" WORK="$WORK/block" LIMIT=240 \
  bash "$SRC/benchmarks/gpu_block_profile.sh"
rm -rf "$WORK/block"

step "slice: 4 layers of the 212B width"
PYTHONPATH="$SRC/src" python3 "$SRC/benchmarks/make_slice.py" "$WORK/slice" --layers 4 --experts 268 --device cuda \
  > "$RES/slice.log" 2>&1 || { step "slice failed"; tail -5 "$RES/slice.log"; exit 1; }
step "build W4A16 (RTN)"
PYTHONPATH=~/tf519:$SRC/src python3 -m reap build "$SRC/recipes/demo.yaml" --model "$WORK/slice" --out "$WORK/run" \
  --iters 0 --tp 1 --set name=qwen3.5-212b-shaped-slice-w4a16 --set model.base_model=random-init-212b-shaped-slice \
  --set quantize.dataset="$WORK/slice/calibration.jsonl" --set quantize.device_map=0 \
  --set quantize.routed_experts=quantize > "$RES/build.log" 2>&1 || { step "build failed"; tail -5 "$RES/build.log"; exit 1; }

step "waiting for the 7 staged parts"
until [ "$(cat ~/stage/part_* 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$SHA" ]; do sleep 3; done
step "unpack vLLM"
cat ~/stage/part_* > ~/b.tar && mkdir -p ~/w && tar xf ~/b.tar -C ~/w \
  && python3 -m pip install -q --no-index --no-deps --no-compile --target ~/site ~/w/*.whl || exit 1
export PYTHONPATH=~/site:~/lmx:$SRC/src

step "serve with vLLM's torch profiler configured (off until /start_profile)"
prof='{"profiler": "torch", "torch_profiler_dir": "'$WORK'/prof", "torch_profiler_with_stack": false}'
python3 -m reap serve "$WORK/run" --detach --port "$PORT" --max-model-len 2048 --timeout 600 -- \
  --gdn-prefill-backend triton --max-num-seqs 16 --profiler-config "$prof" > "$RES/serve.txt" 2>&1 \
  || { step "serve failed"; tail -30 "$RES/serve.txt"; tail -c 6000 "$WORK/run/logs/"serve*.log; exit 1; }
name=$(python3 -c "import json; print(json.load(open('$WORK/run/manifest.json'))['name'])")

step "batch-1 decode: 2 requests of 256 in / 128 out, profiled"
python3 - "$PORT" "$name" "$WORK" "$RES" <<'PY'  # reap bench's own pass arguments; the second one profiled
import json, sys
from pathlib import Path
from reap.bench import Settings, pass_args
port, name, work, res = sys.argv[1:]
url, tok = f"http://127.0.0.1:{port}/v1", Path(work) / "run" / "model"
plain = pass_args(url, name, tok, Settings((1,), 256, 128, num_prompts=8), 1, Path(res) / "unprofiled-c1.json")
profiled = pass_args(url, name, tok, Settings((1,), 256, 128, num_prompts=2, seed=1), 1, Path(res) / "profiled-c1.json")
Path(work, "passes.json").write_text(json.dumps([plain, [*profiled, "--profile"]]))
PY
VLLM_RPC_TIMEOUT=600000 timeout 300 python3 -m reap.vllm_bench "$WORK/passes.json" > "$RES/bench.txt" 2>&1
step "bench exit $?"; grep -E "Output token throughput|Mean TPOT|Median TPOT|Mean ITL" "$RES/bench.txt"
sleep 5
cp "$WORK/prof/profiler_out_0.txt" "$RES/" 2>/dev/null
python3 "$SRC/benchmarks/decode_profile.py" "$WORK/prof" --steps 256 > "$RES/decode_profile.json" 2> "$RES/decode_profile.err"
head -c 4000 "$RES/decode_profile.json"

step "eval_speed: lm-eval's defaults vs reap eval's settings, same server"
timeout 400 python3 "$SRC/benchmarks/eval_speed.py" "$WORK/run" --endpoint "http://127.0.0.1:$PORT/v1" --limit 100 \
  --concurrency 8 > "$RES/eval_speed.txt" 2>&1
step "eval_speed exit $?"; tail -4 "$RES/eval_speed.txt"
python3 -m reap serve "$WORK/run" --stop
tail -c 8000 "$WORK/run/logs/"serve*.log > "$RES/serve-log-tail.txt" 2>/dev/null
cp "$WORK/run/manifest.json" "$RES/manifest.json"
step "done"; touch "$RES/done"
