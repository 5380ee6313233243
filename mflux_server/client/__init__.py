"""A Python client for mflux-server: `Client(url).generate(prompt, wait=True)` returns the images."""

from mflux_server.client.errors import ServerError, TaskCanceled, TaskFailed
from mflux_server.client.sync import AsyncClient, Client

__all__ = ["AsyncClient", "Client", "ServerError", "TaskCanceled", "TaskFailed"]
