"""Settings: flags over MFLUX_SERVER_* variables over defaults, one object for both processes."""

from __future__ import annotations

import pytest

from mflux_server.core.settings import Settings, default_db_path, load_settings


def load(role: str, argv: list[str]):
    return load_settings(role, argv, prog="x", description="x")


def test_defaults_match_the_issue():
    s = load("api", [])
    assert (s.host, s.port, s.db, s.model) == ("127.0.0.1", 4030, default_db_path(), "schnell")
    w = load("worker", [])
    assert (w.engine, w.quantize, w.db) == ("auto", None, s.db)


def test_flags_beat_environment_beats_default(monkeypatch):
    monkeypatch.setenv("MFLUX_SERVER_PORT", "5000")
    monkeypatch.setenv("MFLUX_SERVER_QUANTIZE", "4")
    assert load("api", []).port == 5000
    assert load("api", ["--port", "6000"]).port == 6000
    assert load("worker", []).quantize == 4
    assert load("worker", ["--quantize", "none"]).quantize is None


def test_worker_flags_parse():
    s = load("worker", ["--engine", "synthetic", "--quantize", "8", "--synthetic-step", "0.1,0.2,0.3",
                        "--synthetic-fixed", "1,2", "--synthetic-noise", "0.05", "--synthetic-speed", "4",
                        "--lora-paths", "a.safetensors,b.safetensors", "--lora-scales", "0.5 1.0",
                        "--model-path", "/models/flux"])
    assert s.quantize == 8 and s.synthetic_step == (0.1, 0.2, 0.3) and s.synthetic_fixed == (1.0, 2.0)
    assert s.lora_paths == ["a.safetensors", "b.safetensors"] and s.lora_scales == [0.5, 1.0]


@pytest.mark.parametrize("argv", [["--quantize", "7"], ["--engine", "gpu"], ["--synthetic-step", "1,2"],
                                  ["--lora-paths", "a", "--lora-scales", "1 2"], ["--synthetic-speed", "0"]])
def test_bad_worker_flags_exit_2_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load("worker", argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_environment_value_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("MFLUX_SERVER_PORT", "many")
    with pytest.raises(SystemExit):
        load("api", [])
    assert "MFLUX_SERVER_PORT" in capsys.readouterr().err


def test_settings_reject_bad_combinations():
    with pytest.raises(ValueError):
        Settings(engine="cuda")


def test_a_postgresql_url_is_kept_as_given_and_a_path_is_expanded(monkeypatch):
    url = "postgresql://mflux@db.internal/mflux?sslmode=verify-full"
    assert load_settings("worker", ["--db", url], "mflux-worker", "").db == url
    monkeypatch.setenv("MFLUX_SERVER_DB", url)
    assert load_settings("api", [], "mflux-server", "").db == url
    assert load_settings("api", ["--db", "~/q.db"], "mflux-server", "").db.endswith("/q.db")
    assert "~" not in load_settings("api", ["--db", "~/q.db"], "mflux-server", "").db
