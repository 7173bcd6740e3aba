"""Sagas for payments: reversals owed by the switch, journaled and sent store-and-forward.

fluxrig/saga/reversal.py builds reversal messages (sans-IO), saf.py holds the journal events
and the per-destination scheduler (sans-IO), store.py the journal on disk, orchestrator.py
the engine the `conductor` gear drives.
"""

from .orchestrator import OwedReversal, Reversals, SagaSettings
from .reversal import ReversalPolicy, build_reversal, original_data_elements, repeat_mti
from .saf import SafQueue, Saga, backoff, fold
from .store import SagaStore, read_journal, read_parked

__all__ = [
    "OwedReversal",
    "Reversals",
    "SagaSettings",
    "ReversalPolicy",
    "build_reversal",
    "original_data_elements",
    "repeat_mti",
    "SafQueue",
    "Saga",
    "backoff",
    "fold",
    "SagaStore",
    "read_journal",
    "read_parked",
]
