"""python -m bench: run the benchmarks against the real processes and write docs/benchmarks.md."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import (
    api_load,
    compat_surfaces,
    dispatch,
    duty_cycle,
    event_streams,
    forecast_accuracy,
    forecast_ranges,
    loop_stalls,
    lora_switching,
    model_switching,
    report,
    shared_service,
    slow_clients,
    two_stores,
)
from bench.report import machine
from mflux_server.testing import ROOT

NAMES = ("duty", "dispatch", "load", "streams", "slow", "surfaces", "shared", "forecast", "switching", "stores", "stalls",
         "loras", "ranges")
EXPLANATIONS_FILE = ROOT / "bench" / "explanations.md"


def explanations() -> dict[str, str]:
    """Per-benchmark explanations kept in bench/explanations.md under '## <benchmark name>' headings."""
    if not EXPLANATIONS_FILE.exists():
        return {}
    found: dict[str, str] = {}
    current = None
    for line in EXPLANATIONS_FILE.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            found[current] = ""
        elif current:
            found[current] += line + "\n"
    return {k: v.strip() for k, v in found.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks; exit 0 when every target is met (or in smoke mode, when all ran)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny versions that only check each benchmark runs")
    parser.add_argument("--only", choices=NAMES, action="append", help="run only these (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where benchmarks.md and the plot go")
    args = parser.parse_args(argv)
    chosen = args.only or list(NAMES)
    results = []
    plot_name = "forecast-accuracy.png"
    for name in chosen:
        print(f"running {name}{' (smoke)' if args.smoke else ''} …", file=sys.stderr, flush=True)
        if name == "duty":
            results.append(duty_cycle.run(args.smoke))
        elif name == "dispatch":
            results.append(dispatch.run(args.smoke))
        elif name == "load":
            load = api_load.run(args.smoke)
            results += [load, load.extra.pop("memory")]
        elif name == "streams":
            results.append(event_streams.run(args.smoke))
        elif name == "slow":
            results.append(slow_clients.run(args.smoke))
        elif name == "surfaces":
            results.append(compat_surfaces.run(args.smoke))
        elif name == "shared":
            results.append(shared_service.run(args.smoke))
        elif name == "forecast":
            results.append(forecast_accuracy.run(args.smoke, plot_path=args.out / plot_name))
        elif name == "ranges":
            results.append(forecast_ranges.run(args.smoke))
        elif name == "switching":
            results.append(model_switching.run(args.smoke))
        elif name == "stores":
            results.append(two_stores.run(args.smoke))
        elif name == "stalls":
            results.append(loop_stalls.run(args.smoke))
        elif name == "loras":
            results.append(lora_switching.run(args.smoke))
        for figure in results[-1].figures:
            print(f"  {figure.label}: {figure.shown()} {('(target ' + figure.target + ')') if figure.target else ''}",
                  file=sys.stderr)
    command = "make bench" + (f" ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else "")
    page = report.render(results, machine(), command, plot_name if "forecast" in chosen else None, explanations())
    report.write(args.out / "benchmarks.md", page)
    print(f"wrote {args.out / 'benchmarks.md'}", file=sys.stderr)
    return 0 if args.smoke or all(r.met for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
