#!/usr/bin/env bash
# The newcomer's path timed on a fresh clone (docs/benchmarks.md, "The newcomer's path"): `make demo` split into
# set-up, the demo model and `reap run recipes/demo.yaml` (with the run's own stage times), then one vLLM CPU
# server start of the W4A16 build with and without --enforce-eager (reap's default on the CPU build).
#   benchmarks/newcomer_timing.sh [CLONE_DIR]      (default /tmp/reap-newcomer; removed and cloned anew)
set -euo pipefail
src=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
dir=${1:-/tmp/reap-newcomer}
rm -rf "$dir"
git clone -q "$src" "$dir"
cd "$dir"
now() { date +%s.%N; }
t0=$(now)
make setup > setup.log 2>&1
t1=$(now)
make runs/demo-source > demo-model.log 2>&1
t2=$(now)
.venv/bin/reap run recipes/demo.yaml > run.log 2>&1
t3=$(now)
# the same W4A16 build served once compiled (torch.compile warm-up) and once eager, started and stopped by reap
startup() {  # $1: serve.enforce_eager as the run's recipe records it
  .venv/bin/python - "$1" <<'PY'
import json, sys
from pathlib import Path
m = Path("runs/demo/manifest.json")
d = json.loads(m.read_text())
d["recipe"]["serve"]["enforce_eager"] = json.loads(sys.argv[1])
m.write_text(json.dumps(d, indent=2))
PY
  .venv/bin/reap serve runs/demo --detach --port 8765 > /dev/null
  .venv/bin/python -c 'import json; print(json.load(open("runs/demo/manifest.json"))["stages"]["serve"]["startup_s"])'
  .venv/bin/reap serve runs/demo --stop > /dev/null
}
compiled=$(startup false)
eager=$(startup true)
startup null > /dev/null  # back to the recipe as written
.venv/bin/python - "$t0" "$t1" "$t2" "$t3" "$compiled" "$eager" <<'PY'
import json, sys
t0, t1, t2, t3, compiled, eager = map(float, sys.argv[1:])
stages = json.load(open("runs/demo/manifest.json"))["pipeline"]["stages"]
print(f"make demo: {t3 - t0:.0f} s = set-up {t1 - t0:.0f} s + demo model {t2 - t1:.0f} s + reap run {t3 - t2:.0f} s")
print("reap run stages: " + ", ".join(f"{k} {v.get('wall_s', 0):.0f} s" for k, v in stages.items()))
print(f"vLLM CPU start of the W4A16 demo build: compiled {compiled:.1f} s, --enforce-eager {eager:.1f} s")
PY
