"""Put first on PYTHONPATH of vLLM's CPU server by `reap serve`, so that every Python process of that server
(the API server, its engine core and workers, vLLM's model-inspection subprocess) gets reap's shims before
anything imports torchvision or loads vLLM's C ops: the torchvision op schemas, and the int4 linear op that
vLLM's AVX2 library lacks. Nothing outside that process tree sees them."""

import sys

for _name in ("ensure_torchvision_importable", "ensure_cpu_wna16_gemm"):
    try:
        from reap import compat

        getattr(compat, _name)()
    except Exception as exc:  # never break interpreter start-up; vLLM's own error will say what failed
        print(f"reap cpu_site: {_name} not applied: {exc}", file=sys.stderr)
