from mflux_server.cli import main

raise SystemExit(main())
