"""The benchmarks still run: a tiny version of each, against the real processes, in about a minute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_runs_and_writes_the_report(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "benchmarks.md").read_text()
    for heading in ("## GPU duty cycle", "## Dispatch latency", "## API under load", "## Memory", "## Event streams",
                    "## Slow clients", "## Compatible surfaces and webhooks", "## Forecast accuracy"):
        assert heading in page
    assert "Machine: " in page and "cores" in page
    assert (tmp_path / "forecast-accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "nan" not in page.lower()
