"""Schema-driven fuzzing with schemathesis against a real API and synthetic worker (make test: short; make fuzz: long)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from mflux_server.testing import fresh_queue

CONFIG = Path(__file__).with_name("schemathesis.toml")
# The whole-queue event stream never ends by design, so a fuzzer's request would never finish; one task's stream
# (which ends with its task) stands for both, and tests/process/test_events.py covers this one.
EXCLUDED_PATHS = "^/api/events$"


def fuzz(examples: int, seed: str | None = None, timeout: float = 3600, workers: int = 1) -> subprocess.CompletedProcess[str]:
    """Run every check against a fresh server, but those for accounts (no auth here) and positive data acceptance
    (see schemathesis.toml); returns schemathesis' run."""
    with fresh_queue() as procs:
        # The synchronous surfaces wait for their images: a fast worker and a short --sync-timeout (a documented
        # 504) keep each answer within schemathesis' response-time check while fuzzed tasks pile up.
        url = procs.server("--max-input-bytes", "200000", "--sync-timeout", "4")
        procs.worker("--models", "schnell,dev,dev-kontext,dev-fill", speed=2000)
        command = [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG), "run",
                   url + "/openapi.json", "--checks", "all",
                   "--exclude-checks", "ignored_auth,object_level_authorization,positive_data_acceptance",
                   "--exclude-path-regex", EXCLUDED_PATHS, "--max-examples", str(examples), "--workers", str(workers),
                   "--no-color"]
        if seed:
            command += ["--seed", seed]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def main() -> int:
    """make fuzz: a long run; prints schemathesis' report and exits with its status."""
    parser = argparse.ArgumentParser(description=__doc__)
    # 19 operations × 2,000 examples: over 20,000 cases (13 operations × 2,500 gave 22,979 in 638 s here)
    parser.add_argument("--examples", type=int, default=2000, help="examples per operation and phase")
    parser.add_argument("--workers", type=int, default=2, help="concurrent schemathesis workers")
    parser.add_argument("--seed")
    args = parser.parse_args()
    run = fuzz(args.examples, args.seed, timeout=4 * 3600, workers=args.workers)
    print(run.stdout, run.stderr, sep="\n")
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main())
