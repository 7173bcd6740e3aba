"""Metadata keys the gears share, spelled once.

A message's `meta` is a str -> str map; these are the keys more than one gear reads or writes
(a gear's private keys stay in its own module). Routing a reply back to its connection, the
kill switch's "close this connection" and the error-port convention all hang on them, so a
misspelt key is a reply that never finds its way: use the constants.
"""

from __future__ import annotations

__all__ = [
    "CONN_ID",
    "CONN_GEAR",
    "PEER_IP",
    "PEER_PORT",
    "SOURCE",
    "SERIAL_PORT",
    "ERROR_REASON",
    "ERROR_GEAR",
    "GROUP_RELAY_FROM",
    "GROUP_RELAY_TS",
    "ERROR_DETAIL",
    "ERROR_OFFSET",
    "ERROR_SIZE",
    "ERROR_LIMIT",
    "ERROR_CRC_EXPECTED",
    "ERROR_CRC_ACTUAL",
    "LOG_MASK",
    "ISO_MTI",
    "ISO_MTI_CLASS",
    "ISO_FIELDS",
    "ISO_BITMAPS",
    "ISO_RAW_HEADER",
    "ISO_VIOLATIONS",
    "CODEC_SPEC_ID",
    "CODEC_SPEC_VERSION",
    "CODEC_SPEC_HASH",
    "CODEC_PROTOCOL",
    "CONDUCTOR_ROUTE",
    "ROUTER_RULE",
    "LINK_UP",
    "LINK_DOWN",
    "CONN_CLOSE",
    "RETURN_KEYS",
    "link_topic",
]

# -- where a frame came from, and where its reply goes ------------------------------------------
CONN_ID = "conn.id"  # one per connection (or per open of a serial device); replies are routed by it
CONN_GEAR = "conn.gear"  # the I/O gear that owns the connection: a kill switch addresses it there
PEER_IP = "peer.ip"
PEER_PORT = "peer.port"
SOURCE = "flux.source"  # the I/O gear type that read the frame
SERIAL_PORT = "serial.port"

# -- the error-port convention ------------------------------------------------------------------
ERROR_REASON = "error.reason"  # a short word: decode_error, timeout, no_route, ...
ERROR_GEAR = "error.gear"
#: Set by fluxrig.gears.group_relay on a message relayed between members of a Rack group
#: (issue 17): the Rack that relayed it, and when (ns since the epoch).
GROUP_RELAY_FROM = "group.relay.from"
GROUP_RELAY_TS = "group.relay.ts"
ERROR_DETAIL = "error.detail"
ERROR_OFFSET = "error.offset"
ERROR_SIZE = "error.size"
ERROR_LIMIT = "error.limit"  # the limit an oversize frame broke
ERROR_CRC_EXPECTED = "error.crc_expected"
ERROR_CRC_ACTUAL = "error.crc_actual"

# -- logging --------------------------------------------------------------------------------------
LOG_MASK = "log.mask"  # data paths holding sensitive values: every message logger masks them

# -- ISO 8583 -------------------------------------------------------------------------------------
ISO_MTI = "iso8583.mti"
ISO_MTI_CLASS = "iso8583.mti_class"
ISO_FIELDS = "iso8583.fields"
ISO_BITMAPS = "iso8583.bitmaps"
ISO_RAW_HEADER = "iso8583.raw_header"
ISO_VIOLATIONS = "iso8583.violations"  # spec rules a message broke: "rule:field,..." (never values)
CODEC_SPEC_ID = "codec.spec_id"
CODEC_SPEC_VERSION = "codec.spec_version"
CODEC_SPEC_HASH = "codec.spec_hash"
CODEC_PROTOCOL = "codec.protocol"

# -- routing --------------------------------------------------------------------------------------
CONDUCTOR_ROUTE = "conductor.route"
ROUTER_RULE = "router.rule"

# -- link events and in-Rack control commands (the values of `event` / `cmd`) ---------------------
LINK_UP = "conn.up"
LINK_DOWN = "conn.down"
CONN_CLOSE = "conn.close"

#: What a correlating gear keeps of a request so that its reply finds the way back.
RETURN_KEYS = (CONN_ID, CONN_GEAR, PEER_IP, PEER_PORT, SOURCE, ISO_RAW_HEADER)


def link_topic(gear: str) -> str:
    """The in-Rack control-bus topic on which an I/O gear announces its link events."""
    return f"link.{gear}"
