"""mflux_server.worker: the generation process that holds the model and runs queued tasks one at a time.

Installed as mflux_server.worker (setup.cfg maps this folder); it imports the core, never the API.
"""
