"""`map`: declarative edits of a message's meta, data and raw payload.

Config `ops` is an ordered list; each op is one of
  {set: PATH, value: V}     V may be a literal or a template ({{ raw | upper }})
  {copy: PATH, to: PATH}
  {move: PATH, to: PATH}
  {delete: PATH}
PATH is `raw`, `meta.<key>` or `data.<dotted.path>` (a bare dotted path means data).
Templates read the message as it was before the op runs, so ops compose in order.
"""

from __future__ import annotations

from ..msg import FluxMsg
from ..runtime.gear import Gear, Manifest
from ..runtime.registry import register
from ..templates import TemplateError, compile_path, compile_template

__all__ = ["MapGear"]

OP_SCHEMA = {
    "type": "object",
    "properties": {
        "set": {"type": "string", "description": "path to write"},
        "value": {"description": "literal or template"},
        "copy": {"type": "string", "description": "path to read"},
        "move": {"type": "string", "description": "path to read and remove"},
        "to": {"type": "string", "description": "destination path of copy/move"},
        "delete": {"type": "string", "description": "path to remove"},
    },
    "additionalProperties": False,
}

SCHEMA = {
    "type": "object",
    "properties": {
        "ops": {"type": "array", "items": OP_SCHEMA, "default": [], "description": "ordered edits"},
    },
    "required": ["ops"],
    "additionalProperties": False,
}


def _compile_op(op: dict):
    kinds = [k for k in ("set", "copy", "move", "delete") if k in op]
    if len(kinds) != 1:
        raise ValueError("each op needs exactly one of set, copy, move, delete")
    kind = kinds[0]
    if kind == "set":
        if "value" not in op:
            raise ValueError("set needs value")
        path, render = op["set"], compile_template(op["value"])
        if path == "raw":

            def apply(m: FluxMsg):
                v = render(m)
                m.raw = v if isinstance(v, bytes) else (b"" if v is None else str(v).encode())

            return apply
        return lambda m: m.set(path, render(m))
    if kind == "delete":
        path = op["delete"]
        return lambda m: m.delete(path)
    if "to" not in op:
        raise ValueError(f"{kind} needs to")
    src, dst = op[kind], op["to"]
    read = compile_path(src)
    if kind == "copy":
        return lambda m: m.set(dst, read(m))

    def move(m: FluxMsg):
        v = read(m)
        m.delete(src)
        m.set(dst, v)

    return move


@register
class MapGear(Gear):
    MANIFEST = Manifest(
        "map",
        "Declarative set/copy/move/delete over meta, data and raw, with templates",
        category="logic",
        schema=SCHEMA,
        terminus="transparent",
    )

    @staticmethod
    def validate_config(config: dict):
        for i, op in enumerate(config.get("ops") or []):
            try:
                _compile_op(op)
            except (ValueError, TemplateError) as exc:
                yield f"ops[{i}]", str(exc)

    def __init__(self, name, config, ctx):
        super().__init__(name, config, ctx)
        self._ops = tuple(_compile_op(op) for op in config["ops"])
        self._out = None

    async def process(self, port: str, msg: FluxMsg) -> None:
        for op in self._ops:
            op(msg)
        await self.emit("out", msg)
