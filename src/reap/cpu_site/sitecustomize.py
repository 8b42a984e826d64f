"""Put first on PYTHONPATH of vLLM's CPU server by `reap serve`, so that every Python process of that server
(the API server, its engine core, vLLM's model-inspection subprocess) gets reap's torchvision shim before
anything imports torchvision. Nothing outside that process tree sees it."""

try:
    from reap.compat import ensure_torchvision_importable

    ensure_torchvision_importable()
except Exception as exc:  # never break interpreter start-up; vLLM's own error will say what failed
    import sys

    print(f"reap cpu_site: torchvision shim not applied: {exc}", file=sys.stderr)
