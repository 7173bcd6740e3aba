"""Network adapters shared by the I/O gears (asyncio; protocol logic stays in framing/codecs)."""
