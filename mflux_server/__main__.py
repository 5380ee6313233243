"""python -m mflux_server: the API server, as the mflux-server command runs it."""

from mflux_server.api.server import main

raise SystemExit(main())
