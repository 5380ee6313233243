"""python -m mflux_server.worker: the worker, as the mflux-worker command runs it."""

from mflux_server.worker.cli import main

raise SystemExit(main())
