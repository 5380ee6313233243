"""What the API and the worker share: the queue database, its store, the model catalog, settings, logging.

Nothing here imports Flask or mflux; tests/process/test_packaging.py checks it.
"""
