#!/usr/bin/env bash
# On a lent 4-GPU NVIDIA host, after benchmarks/gpu_build_slice.sh built $WORK/run (docs/benchmarks.md):
# serve the W4A16 checkpoint with `reap serve` (kernels recorded in the manifest) and with the seed
# release's exact flags, and run `vllm bench serve` (random 256 in / 128 out) at concurrency 1 and 32
# against each, on the same host in the same run.
#   WORK=/tmp/reap-bench TP=4 bash benchmarks/gpu_serve_bench.sh
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
vllm() { python3 -m vllm.entrypoints.cli.main "$@"; }  # works with a --target install (no console script)
WORK=${WORK:-/tmp/reap-bench} TP=${TP:-4} PROMPTS=${PROMPTS:-64} OUTDIR=${OUT:-$WORK}
RUN="$WORK/run" MODEL="$WORK/run/model" NAME=qwen3.5-212b-shaped-slice-w4a16

bench() {  # $1 label, $2 port
  for c in 1 32; do
    n=$(( c == 1 ? 16 : PROMPTS ))
    vllm bench serve --backend vllm --model "$NAME" --tokenizer "$MODEL" --base-url "http://127.0.0.1:$2" \
      --dataset-name random --random-input-len 256 --random-output-len 128 --ignore-eos \
      --num-prompts "$n" --max-concurrency "$c" --save-result --result-dir "$WORK/bench" \
      --result-filename "$1-c$c.json" > "$WORK/bench-$1-c$c.log" 2>&1
    grep -E "Output token throughput|Mean TPOT" "$WORK/bench-$1-c$c.log" | sed "s/^/$1 c=$c: /"
  done
}

mkdir -p "$WORK/bench"
python3 -m reap serve "$RUN" --tp "$TP" --port 8100 --detach --timeout 300 -- --max-num-seqs 64 ${VLLM_EXTRA:-}
bench reap 8100
python3 -m reap serve "$RUN" --stop
cp "$RUN/manifest.json" "$OUTDIR/manifest-serve.json"

# The seed release's exact command (plus a name and port to reach it).
setsid python3 -m vllm.entrypoints.cli.main serve "$MODEL" --tensor-parallel-size "$TP" --trust-remote-code --quantization gptq \
  --served-model-name "$NAME" --port 8200 --max-num-seqs 64 ${VLLM_EXTRA:-} > "$WORK/seed-serve.log" 2>&1 &
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:8200/health >/dev/null && break; sleep 3; done
grep -E "LinearKernel|MoE backend|forcing|quantization=" "$WORK/seed-serve.log" | head -8 > "$OUTDIR/seed-kernels.txt"
bench seed 8200
pkill -f "port 8200" || true
python3 - "$WORK/bench" > "$OUTDIR/bench-summary.json" <<'EOF'
import json, sys, pathlib
out = {}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    out[f.stem] = {k: d.get(k) for k in ("output_throughput", "mean_tpot_ms", "mean_ttft_ms", "completed", "max_concurrency")}
print(json.dumps(out, indent=2))
EOF
cat "$OUTDIR/bench-summary.json" "$OUTDIR/seed-kernels.txt"
