"""bench/before_after.py's reading of two benchmark pages into one table."""

from __future__ import annotations

from bench.before_after import run, same_figure, table


def test_figures_line_up_across_runs_even_when_their_label_carries_a_measured_rate():
    assert same_figure("SQLite: status latency p99, pollers every 100 ms (313/s)") == \
        "SQLite: status latency p99, pollers every 100 ms"
    assert same_figure("claims per second, 8 processes (claim + complete)") == \
        "claims per second, 8 processes (claim + complete)"


def test_only_the_summary_table_is_read_and_both_sides_share_a_row(tmp_path, monkeypatch):
    page = ("# Benchmarks\n\n| benchmark | figure | value | target | met |\n|---|---|---|---|---|\n"
            "| Dispatch | p50 (12/s) | 8.5 ms | ≤ 20 ms | yes |\n\n## Dispatch\n\n| server | a | b | c | d |\n"
            "|---|---|---|---|---|\n| x | 1 | 2 | 3 | 4 |\n")

    def fake_run(args, **kwargs):  # the benchmark process: it writes the page where --out says
        (tmp_path / "out" / "benchmarks.md").write_text(page)

    monkeypatch.setattr("subprocess.run", fake_run)
    rows = run(tmp_path, "dispatch", tmp_path / "out")
    assert rows == {("Dispatch", "p50"): ("8.5 ms", "≤ 20 ms", "yes")}
    text = table(rows, {("Dispatch", "p50"): ("9.1 ms", "≤ 20 ms", "yes")}, "abc")
    assert text.splitlines()[2] == "| Dispatch | p50 | 8.5 ms | 9.1 ms | ≤ 20 ms | yes | yes |"
