"""mflux-server: a self-hosted queue in front of one GPU per worker."""

__version__ = "0.1.0"
