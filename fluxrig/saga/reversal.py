"""Reversals built from the request they undo (sans-IO).

A reversal (0400 request, or 0420 advice) tells the issuer to undo what it may have approved
for a request whose outcome the switch does not know. Card networks require it to carry:

- the original's amounts and currency (DE 4, 5, 6, 49, 50, 51 when present) and card and
  terminal data, copied per `copy_fields`;
- DE 90 original data elements, 42 digits: original MTI (4), original STAN (6), original
  transmission date and time (DE 7, 10), acquiring (DE 32) and forwarding (DE 33)
  institution ids, each right-justified and zero-filled to 11;
- a reason (`reason_field`, DE 39 by default, as ISO 8583:1987 reversals carry it), one code
  per cause (`when`): `timeout` (no reply before the deadline), `late_approval` (a reply approving
  after the deadline), `link_lost` (the leg dropped after the request was written);
- a new STAN (DE 11, from the conductor's `saf.stan_range`, fluxrig/saga/stan.py) and a new
  DE 7; DE 37 is the original's, or, when the original has none and the route copies DE 37,
  one the switch originates from the new STAN (stan.originated_rrn). Repeats of the same reversal (0401 / 0421) keep its
  STAN and fields: they are the same message sent again, which the issuer deduplicates.

Track data and PIN blocks (DE 35, 36, 45, 52) are never copied: a reversal needs no card
authentication and must not carry it.
"""

from __future__ import annotations

import datetime

from ..errors import ConfigError
from .stan import originated_rrn

__all__ = [
    "CAUSES",
    "DEFAULT_COPY_FIELDS",
    "DEFAULT_REASON_CODES",
    "NEVER_COPIED",
    "ReversalPolicy",
    "build_reversal",
    "original_data_elements",
    "repeat_mti",
    "is_reversal_class",
    "transmission_datetime",
]

CAUSES = ("timeout", "late_approval", "link_lost")
# 68 "response received too late" for a timed-out or late request; 91 "issuer or switch
# inoperative" when the leg dropped after the request was written.
DEFAULT_REASON_CODES = {"timeout": "68", "late_approval": "68", "link_lost": "91"}
DEFAULT_COPY_FIELDS = (2, 3, 4, 5, 6, 12, 13, 14, 18, 22, 23, 32, 33, 37, 41, 42, 43, 49, 50, 51)
NEVER_COPIED = frozenset({"35", "36", "45", "52", "55"})
REVERSAL_MTIS = ("0400", "0420")
REVERSIBLE_DEFAULT = ("0100", "0200")
DE90_SOURCES = frozenset({"7", "11", "32", "33"})


def repeat_mti(mti: str) -> str:
    """0400 -> 0401, 0420 -> 0421 (the repeat of the same message)."""
    return mti[:3] + "1"


def is_reversal_class(mti: str) -> bool:
    """0400/0401/0410/0420/0421/0430 and their 1993 twins (14xx): the reversal family."""
    return len(mti) == 4 and mti[1] == "4"


def transmission_datetime(now: datetime.datetime) -> str:
    """DE 7: MMDDhhmmss in UTC."""
    return now.astimezone(datetime.UTC).strftime("%m%d%H%M%S")


def _n(value, width: int) -> str:
    digits = "".join(ch for ch in str(value or "") if ch.isdigit())
    return digits[-width:].rjust(width, "0")


def original_data_elements(original_mti: str, fields: dict) -> str:
    """DE 90 from the original request's fields (string keys): 42 digits."""
    return (
        _n(original_mti, 4)
        + _n(fields.get("11"), 6)
        + _n(fields.get("7"), 10)
        + _n(fields.get("32"), 11)
        + _n(fields.get("33"), 11)
    )


class ReversalPolicy:
    """Per route: when a reversal is owed and what it looks like (validated config)."""

    __slots__ = (
        "mti", "on", "reason_field", "reason_codes", "copy_fields", "reversible", "approved_codes", "journal_fields",
    )  # fmt: skip

    def __init__(
        self,
        mti: str = "0400",
        on=CAUSES,
        reason_field: int = 39,
        reason_codes: dict | None = None,
        copy_fields=DEFAULT_COPY_FIELDS,
        reversible=REVERSIBLE_DEFAULT,
        approved_codes=("00", "08", "10", "11"),
    ):
        if mti not in REVERSAL_MTIS:
            raise ConfigError(f"must be one of {', '.join(REVERSAL_MTIS)}, not {mti!r}", key="reversal.mti")
        bad = [c for c in on if c not in CAUSES]
        if bad:
            raise ConfigError(f"unknown cause {bad[0]!r} (known: {', '.join(CAUSES)})", key="reversal.when")
        codes = {**DEFAULT_REASON_CODES, **(reason_codes or {})}
        for cause, code in codes.items():
            if cause not in CAUSES or not isinstance(code, str) or len(code) != 2:
                raise ConfigError(
                    f"{cause}: a known cause ({', '.join(CAUSES)}) and a two-character code",
                    key="reversal.reason_codes",
                )
        self.mti = mti
        self.on = frozenset(on)
        self.reason_field = str(int(reason_field))
        self.reason_codes = codes
        self.copy_fields = tuple(str(int(f)) for f in copy_fields if str(int(f)) not in NEVER_COPIED)
        self.reversible = frozenset(reversible)
        self.approved_codes = frozenset(approved_codes)
        # What an open request's journal entry keeps: what its reversal copies, and DE 90's parts.
        self.journal_fields = frozenset(self.copy_fields) | DE90_SOURCES

    @classmethod
    def from_config(cls, cfg: dict | None) -> ReversalPolicy | None:
        """None when the route has no `reversal` section or `enabled: false`."""
        if not cfg or not cfg.get("enabled", True):
            return None
        return cls(
            mti=cfg.get("mti", "0400"),
            on=cfg.get("when", CAUSES),
            reason_field=cfg.get("reason_field", 39),
            reason_codes=cfg.get("reason_codes"),
            copy_fields=cfg.get("copy_fields", DEFAULT_COPY_FIELDS),
            reversible=cfg.get("mtis", REVERSIBLE_DEFAULT),
            approved_codes=cfg.get("approved_codes", ("00", "08", "10", "11")),
        )

    def owes(self, request_mti_class: str, cause: str) -> bool:
        return cause in self.on and request_mti_class in self.reversible

    def approves(self, code) -> bool:
        return code in self.approved_codes


def build_reversal(
    policy: ReversalPolicy, original_mti: str, fields: dict, stan: int, cause: str, now: datetime.datetime
) -> dict:
    """The reversal's fields (string keys, "0" the MTI) for the original request's fields."""
    out = {k: fields[k] for k in policy.copy_fields if k in fields}
    out["0"] = policy.mti
    out["7"] = transmission_datetime(now)
    out["11"] = f"{stan % 1_000_000:06d}"
    if "37" not in out and "37" in policy.copy_fields:
        out["37"] = originated_rrn(now, stan)
    out["90"] = original_data_elements(original_mti, fields)
    out[policy.reason_field] = policy.reason_codes[cause]
    return out
