"""The mflux-server worker: holds the model and runs queued tasks one at a time."""
