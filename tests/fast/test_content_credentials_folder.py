"""Where a worker keeps the key it makes: beside an SQLite queue, else the user's data folder, never the checkout."""

from __future__ import annotations

from pathlib import Path

from mflux_server.worker.content_credentials import default_folder


def test_a_worker_keeps_its_key_beside_the_sqlite_file_or_in_its_data_folder_never_the_working_directory(
        tmp_path, monkeypatch):
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")
    assert default_folder(str(tmp_path / "q" / "queue.db")) == tmp_path / "q" / "mflux-server-c2pa"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_folder("postgresql://mflux@db/mflux") == tmp_path / "data" / "mflux-server" / "c2pa"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = default_folder("postgresql://mflux@db/mflux")
    assert folder == tmp_path / "home" / ".local" / "share" / "mflux-server" / "c2pa"
    assert Path.cwd() not in folder.parents
