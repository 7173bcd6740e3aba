"""`generator`: timed messages from a template.

Config: `count` (0 = until stopped), `interval` (duration between messages), `start_delay`,
and `template` with `raw`, `meta`, `data`, whose strings may use `{{ seq }}` (1, 2, ...) and
`{{ now }}` (Unix ns) besides the usual template paths. The emitter waits on backpressure,
so a slow pipeline slows the generator instead of losing messages.
"""

from __future__ import annotations

import asyncio
import time

from ..durations import parse_duration
from ..msg import FluxMsg
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register
from ..templates import compile_template
from ..wire import meta as M

__all__ = ["GeneratorGear"]

SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 0, "default": 0, "description": "messages to send; 0 = until stopped"},
        "interval": {"type": "string", "format": "duration", "default": "1s", "description": "time between messages"},
        "start_delay": {
            "type": "string",
            "format": "duration",
            "default": "0s",
            "description": "wait before the first",
        },
        "template": {
            "type": "object",
            "properties": {
                "raw": {"type": "string", "description": "payload text (templates allowed)"},
                "meta": {"type": "object", "description": "metadata (templates allowed)"},
                "data": {"type": "object", "description": "data (templates allowed)"},
            },
            "additionalProperties": False,
            "default": {"raw": "tick {{ seq }}"},
            "description": "the message to produce",
        },
    },
    "additionalProperties": False,
}


@register
class GeneratorGear(Gear):
    MANIFEST = Manifest(
        "generator",
        "Emits timed messages from a template (count, interval)",
        category="io",
        inputs=(),
        schema=SCHEMA,
        terminus="io",
    )

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        self._seq = 0
        extra = {"seq": lambda m: self._seq, "now": lambda m: time.time_ns()}
        tpl = config["template"]
        self._raw = compile_template(tpl.get("raw", ""), extra)
        self._meta = compile_template(tpl.get("meta") or {}, extra)
        self._data = compile_template(tpl.get("data") or {}, extra)
        self._interval = parse_duration(config["interval"])
        self._delay = parse_duration(config["start_delay"])
        self._task: asyncio.Task | None = None
        self.done = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"generator:{self.name}")

    async def _run(self) -> None:
        count = self.config["count"]
        loop = asyncio.get_running_loop()
        try:
            if self._delay:
                await asyncio.sleep(self._delay)
            next_at = loop.time()
            while not count or self._seq < count:
                self._seq += 1
                proto = FluxMsg()
                raw = self._raw(proto)
                msg = FluxMsg(
                    raw=raw if isinstance(raw, bytes) else str(raw).encode(),
                    meta={k: str(v) for k, v in self._meta(proto).items()},
                    data=self._data(proto),
                )
                msg.meta[M.SOURCE] = "generator"
                try:
                    await self.emit("out", msg)
                except Exception as exc:  # backpressure timeout or a broken pipeline: count, go on
                    self.counters.errors += 1
                    self.log.warning("generator %s: message %d not delivered: %s", self.name, self._seq, exc)
                next_at += self._interval
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    next_at = loop.time()  # behind schedule: do not burst to catch up
                    await asyncio.sleep(0)
        finally:
            self.done.set()

    async def drain(self, deadline: float) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
