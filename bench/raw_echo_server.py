"""The baseline: a raw asyncio-streams echo server for 2-byte big-endian length-prefixed frames
(PostChannel style), written for the benchmark with no framework around it."""

import asyncio
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            hdr = await reader.readexactly(2)
            body = await reader.readexactly(int.from_bytes(hdr, "big"))
            writer.write(hdr + body)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(main(int(sys.argv[1])))
