"""Shadows uvloop for `bench/pipeline.py --loop asyncio`: importing it fails like a missing package."""

raise ImportError("uvloop hidden by bench/_no_uvloop for a stock-asyncio run")
