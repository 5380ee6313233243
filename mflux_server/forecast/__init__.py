"""The forecast: a pure cost model fitted to measured timings, and a queue view that prices the line ahead.

No Flask here; the queue view reads through core.store only.
"""
