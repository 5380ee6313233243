"""Packaging and boundaries: one installed namespace, and neither process imports the other's stack."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from mflux_server.store.migration_files import migration_files

ROOT = Path(__file__).resolve().parents[2]
WEB_STACK = ("flask", "werkzeug", "marshmallow", "gunicorn", "flask_smorest", "webargs", "apispec")
MODEL_STACK = ("mflux", "mlx")


def imported_by(statement: str) -> set[str]:
    """Top-level modules a fresh interpreter has loaded after running a statement."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return set(done.stdout.split())


def test_the_worker_imports_no_web_stack():
    loaded = imported_by("import mflux_server.worker.cli, mflux_server.worker.supervisor, mflux_server.worker.engines")
    assert not loaded & set(WEB_STACK), loaded & set(WEB_STACK)
    assert "mflux_server" in loaded


def test_the_api_imports_no_model_stack():
    loaded = imported_by("import mflux_server.api.server, mflux_server.api.app")
    assert not loaded & set(MODEL_STACK), loaded & set(MODEL_STACK)
    assert "flask" in loaded


def test_the_store_the_core_and_the_forecast_import_neither_stack():
    loaded = imported_by("import mflux_server.store, mflux_server.core.settings, mflux_server.core.catalog, "
                         "mflux_server.core.logs, mflux_server.forecast.queue_view")
    assert not loaded & set(WEB_STACK + MODEL_STACK), loaded & set(WEB_STACK + MODEL_STACK)


def test_no_generic_worker_package_is_importable():
    done = subprocess.run([sys.executable, "-c", "import worker"], capture_output=True, text=True, cwd="/")
    assert done.returncode == 1 and "No module named 'worker'" in done.stderr


def test_the_wheel_installs_one_namespace_with_its_sql(tmp_path: Path):
    # Built from a copy without build outputs: setuptools reuses build/lib, which keeps files since renamed or removed.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns("build", ".venv", ".git", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("mflux_server-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"mflux_server", wheel.name.split("-py")[0] + ".dist-info"}
    for folder, dialect in (("mflux_server/migrations/", ""), ("mflux_server/migrations/postgresql/", "postgresql")):
        inside = [n[len(folder):] for n in names if n.startswith(folder)]
        shipped = sorted(n for n in inside if n.endswith(".sql") and "/" not in n)
        assert shipped == [name for _, name, _ in migration_files(dialect)]
    for module in ("mflux_server/store/queries.sql", "mflux_server/store/sqlite/queries.sql",
                   "mflux_server/store/postgresql/queries.sql", "mflux_server/worker/cli.py",
                   "mflux_server/worker/engines/mflux.py",
                   "mflux_server/api/app.py", "mflux_server/forecast/cost_model.py", "mflux_server/web/index.html",
                   "mflux_server/web/app.js", "mflux_server/web/style.css", "mflux_server/client/cli.py"):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mflux-worker = mflux_server.worker.cli:main" in entry_points
    assert "mflux-server = mflux_server.api.server:main" in entry_points
    assert "mflux-client = mflux_server.client.cli:main" in entry_points
