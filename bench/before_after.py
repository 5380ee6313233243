"""python -m bench.before_after REF: each benchmark run on commit REF and on the working tree, in turns, one table.

Side by side in one run: benchmark by benchmark, first REF's code (a git worktree in a temporary folder), then
this checkout's, so both see the machine's drift alike. Prints a Markdown table of every figure with both
values, its target and whether each met it, and writes it to --out. Exits non-zero when the working tree
misses a target that REF met.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.__main__ import NAMES
from mflux_server.testing import ROOT


def worktree(ref: str, folder: Path) -> Path:
    """A checkout of ref in folder, importable the way the installed package is laid out."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(folder), ref], check=True,
                   capture_output=True)
    # Installed, worker/ and migrations/ are mflux_server.worker and mflux_server.migrations (setup.cfg).
    (folder / "mflux_server" / "worker").symlink_to("../worker")
    (folder / "mflux_server" / "migrations").symlink_to("../migrations")
    return folder


def run(checkout: Path, name: str, out: Path) -> dict[tuple[str, str], tuple[str, str, str]]:
    """One benchmark on one checkout: {(benchmark, figure): (value, target, met)} from its summary table."""
    out.mkdir(parents=True, exist_ok=True)
    # PYTHONPATH first: the checkout's packages, not the editable install's, in the benchmark and its processes.
    env = dict(os.environ, PYTHONPATH=str(checkout))
    with open(out / "log.txt", "w") as log:
        subprocess.run([sys.executable, "-m", "bench", "--only", name, "--out", str(out)], cwd=checkout, env=env,
                       stdout=log, stderr=subprocess.STDOUT, check=False)
    page = out / "benchmarks.md"
    if not page.exists():
        return {}
    rows = {}
    lines = page.read_text().splitlines()
    start = lines.index("| benchmark | figure | value | target | met |") + 2
    for line in lines[start:]:  # the summary table only, up to its end (explanations hold tables of their own)
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows[(cells[0], same_figure(cells[1]))] = (cells[2], cells[3], cells[4])
    return rows


def same_figure(label: str) -> str:
    """A figure's label without the rate measured in it ("pollers every 100 ms (313/s)"), so runs line up."""
    return re.sub(r" \(\d[\d,.]*/s\)", "", label)


def table(before: dict, after: dict, ref: str) -> str:
    """The figures of both runs as one Markdown table, in the order the benchmarks printed them."""
    lines = [f"| benchmark | figure | before ({ref}) | after | target | met before | met after |",
             "|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys([*before, *after]):
        old = before.get(key, ("not run", "", ""))
        new = after.get(key, ("not run", "", ""))
        lines.append(f"| {key[0]} | {key[1]} | {old[0]} | {new[0]} | {new[1] or old[1]} | {old[2]} | {new[2]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks on both sides and write the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.before_after", description=__doc__)
    parser.add_argument("ref", help="the commit to compare with (its code runs from a temporary worktree)")
    parser.add_argument("--only", choices=NAMES, action="append", help="run only these (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "before_after.md",
                        help="the table's file (or a folder to write before_after.md and each side's page in)")
    args = parser.parse_args(argv)
    before: dict = {}
    after: dict = {}
    with tempfile.TemporaryDirectory(prefix="mflux-before-") as tmp:
        old = worktree(args.ref, Path(tmp) / "checkout")
        try:
            for name in args.only or NAMES:
                print(f"{name}: {args.ref} …", file=sys.stderr, flush=True)
                before |= run(old, name, Path(tmp) / "before" / name)
                print(f"{name}: working tree …", file=sys.stderr, flush=True)
                after |= run(ROOT, name, Path(tmp) / "after" / name)
                if args.out.is_dir():  # each side's own page too: its notes (such as benchmark 12's pairs)
                    for side in ("before", "after"):
                        page = Path(tmp) / side / name / "benchmarks.md"
                        if page.exists():
                            shutil.copyfile(page, args.out / f"{side}-{name}.md")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False,
                           capture_output=True)
    text = table(before, after, args.ref)
    print(text, flush=True)  # first: a bad --out must not lose minutes of runs
    out = args.out / "before_after.md" if args.out.is_dir() else args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    regressed = [key for key, (_, _, met) in after.items() if met == "**no**" and before.get(key, ("", "", ""))[2] == "yes"]
    for key in regressed:
        print(f"missed after, met before: {key[0]}: {key[1]}", file=sys.stderr)
    return 1 if regressed else 0


if __name__ == "__main__":
    raise SystemExit(main())
