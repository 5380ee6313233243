"""python -m bench.random_weights_worker [mflux-worker flags]: the real worker, mflux's networks with random weights.

MFLUX_RANDOM_DEPTH=N cuts every network to N blocks (MFLUX_RANDOM_SHARE=1: text encoders keep their depth on
the weights of N blocks), MFLUX_RANDOM_TEXT_TOKENS=N pads prompts to at most N tokens (unset: full depth and the
models' own lengths). See bench/random_weights.py.
"""

from __future__ import annotations

import os

from bench import random_weights


def main() -> int:
    """Install the random weights, then run mflux-worker's own entry point."""
    random_weights.install(depth=int(os.environ.get("MFLUX_RANDOM_DEPTH") or 0) or None,
                           text_tokens=int(os.environ.get("MFLUX_RANDOM_TEXT_TOKENS") or 0) or None,
                           share_text_encoders=os.environ.get("MFLUX_RANDOM_SHARE") == "1")
    from mflux_server.worker.cli import main as worker_main

    return worker_main()


if __name__ == "__main__":
    raise SystemExit(main())
