"""The Snake's JetStream streams: what they hold, how long, and what happens when one is full.

Job. Define and create (or update in place) the streams the Mixer owns, in one place: the
two below from the `[snake]` configuration, and `fluxrig-audit` (audit_stream_config, the
operators' audit trail every node reads: api/shared_audit.py, limits `api.audit_max_age` and
`api.audit_max_bytes`, discard OLD):

* `flux-msg` (fluxrig.wire.subjects.STREAM_MSG, `flux.msg.>`): the guaranteed lane between
  Racks. The promise is that no message a sender was acknowledged for (PubAck) is removed
  before its consumer acknowledged it, so:

  - retention LIMITS with **discard NEW**: a full stream *refuses* a new message instead of
    evicting an old one. The publisher gets a 503 PubAck error (JetStream err_code 10077,
    "maximum bytes exceeded" / "maximum messages per subject exceeded"; nats-py raises
    `nats.js.errors.ServiceUnavailableError`), its records stay in its lane WAL (the Rack's
    pump retries with back-off and counts `quota_rejections`, fluxrig/agent/publisher.py),
    and they flow once there is room. That is the push-back into the sender's WAL.
  - a per-source quota: `max_msgs_per_subject` (`snake.lane_max_msgs_per_subject`) with
    `discard_new_per_subject`. A subject is one source port of one Rack
    (`flux.msg.<rack>.<gear>.<port>`), so one Rack's big or fast output fills its own quota
    and is pushed back alone, instead of evicting (or, with only a stream-wide cap, starving)
    another Rack's payments. The stream-wide `max_bytes` (`snake.stream_max_bytes`) stays the
    hard bound of the whole lane on the Mixer's disk.
  - the quota is a *byte* bound although JetStream counts messages per subject (it has no
    per-subject byte limit): the stream also caps each message (`max_msg_size`,
    `snake.lane_max_msg_bytes`, LANE_MAX_MSG_BYTES: the largest batch a Rack sends), and with
    `snake.lane_subject_share` set (e.g. 0.25, LANE_SUBJECT_SHARE) the per-subject count is at
    most `stream_max_bytes * share // lane_max_msg_bytes` batches, so one subject holds at most
    that share of the stream (124 for a quarter of 1 GiB; lane_quota()). What that costs: with a live receiver the Mixer removes
    consumed batches every 2 s (lanes.PURGE_INTERVAL_S, eagerly once a subject is half full),
    so a port publishing more than about 60 batches/s meets push-back until its batches grow
    (records wait in its lane WAL, and its pump retries a full quota after up to 5 s): at a
    switch's rates (hundreds of small batches/s per port) that stalled healthy lanes in the
    lane tests. So the default stays 1024 batches per port (DEFAULT_LANE_MAX_MSGS_PER_SUBJECT),
    which keeps healthy lanes free of push-back but lets one port with big batches fill the
    1 GiB stream (1024 x 1 MiB) and push every other Rack back (refused and held in their
    WALs, never lost); said at start (INFO at the default, WARNING for another explicit count).
    Sites that prefer isolation to burst latency set `snake.lane_subject_share`. Lowering the count of an existing stream below what a
    subject holds would make JetStream trim that subject's oldest (unconsumed) messages, so
    ensure_streams keeps the larger count until it drains, with a WARNING.
  - **no age limit** unless the operator sets `snake.lane_undelivered_max_age`: a receiver
    away for a week finds its backlog. What an age limit costs: JetStream then deletes
    undelivered messages older than it, without telling anyone, although their senders were
    acknowledged (their lane WAL let them go): a receiver away longer loses them. It exists for
    sites that prefer bounded staleness to completeness (the Mixer logs the choice at start).
    The former `snake.stream_max_age` (24 h by default, the age of *every* message) no longer
    applies to flux-msg: delivered messages are removed once consumed, whatever their age; a
    non-zero value is logged at start as ignored.
  - delivered messages are removed by the Mixer, not by a retention policy:
    fluxrig_mixer.lanes.LaneConsumers purges, per subject, what every consumer filtering that
    subject has acknowledged (its ack floor). Interest retention would do that natively but
    deletes at once any message published while no consumer matches its subject (a Snake that
    lost its store, a consumer being recreated): a silent loss this design does not have.
    Work-queue retention forbids two consumers on one subject (one output wired to two Racks).

* `flux-telemetry` (`flux.telemetry.>`): a buffer in front of the Mixer's ingest, which acks
  only what it stored and purges what it acked (ingest._purge_loop); limits retention,
  **discard NEW** (archive, issue 15: a store outage longer than `telemetry_max_bytes` lasts
  pushes back into the Racks' WALs instead of evicting telemetry not yet stored),
  `telemetry_max_age` / `telemetry_max_bytes`.

Both: file storage, the duplicate window the Racks' dedup ids rely on (DUPLICATE_WINDOW_S), and
`replicas` copies: one on a single node (the Standard tier), `cluster.replicas` (default 3) on a
cluster member (issue 14; `replicas_for(cfg)` is the one place that decides it, for the KV
buckets too). Raising the count of an existing stream (a single node that joined a cluster) is
an in-place update: nats-server copies the data to the new peers. `ensure_streams()` creates a missing stream and updates an
existing one in place (a stream created by an older Mixer with discard OLD and 24 h is moved to
the settings above at the next start; JetStream keeps its messages).
"""

from __future__ import annotations

import logging

from fluxrig.wire import subjects as S

__all__ = [
    "ensure_streams",
    "ensure_stream",
    "audit_stream_config",
    "msg_stream_config",
    "telemetry_stream_config",
    "saf_stream_config",
    "SAF_MAX_AGE_S",
    "SAF_MAX_BYTES",
    "DUPLICATE_WINDOW_S",
    "DEFAULT_LANE_MAX_MSGS_PER_SUBJECT",
    "LANE_MAX_MSG_BYTES",
    "LANE_SUBJECT_SHARE",
    "lane_quota",
    "QUOTA_ALERT_RATIO",
    "QUOTA_CLEAR_RATIO",
    "NUM_REPLICAS",
    "replicas_for",
]

log = logging.getLogger("fluxrig.mixer.streams")

DUPLICATE_WINDOW_S = 120.0
#: The largest guaranteed-lane message a Rack sends: a batch of up to 1 MiB of records
#: (fluxrig.agent.lane_codec.LANE_LIMITS) or one FluxMsg at its 2 MiB limit (fluxrig.msg),
#: plus the batch framing and headers. flux-msg refuses (for good) a message above
#: `snake.lane_max_msg_bytes`, so it must stay above what the Racks send.
LANE_MAX_MSG_BYTES = 2 * 1024 * 1024 + 64 * 1024
#: A share of flux-msg one source port (subject) may be bounded to (`snake.lane_subject_share`,
#: 0 by default = no bound beyond the count: see the module docstring for why).
LANE_SUBJECT_SHARE = 0.25
#: The default: healthy lanes never meet push-back (see the module docstring for its cost).
DEFAULT_LANE_MAX_MSGS_PER_SUBJECT = 1024
#: The Mixer alerts when a quota is this full, and clears the alert below QUOTA_CLEAR_RATIO.
QUOTA_ALERT_RATIO = 0.8
QUOTA_CLEAR_RATIO = 0.7
#: JetStream's err_code for "stream name already in use with a different configuration".
STREAM_NAME_IN_USE = 10058
NUM_REPLICAS = 1  # a single node (Standard tier)


def replicas_for(cfg) -> int:
    """Replicas of every stream and bucket the Mixer creates: 1 on a single node,
    `cluster.replicas` on a cluster member (MixerConfig.clustered)."""
    return int(cfg.cluster.replicas) if getattr(cfg, "clustered", False) else NUM_REPLICAS


def _cfg(snake_cfg, key: str, default):
    value = getattr(snake_cfg, key, default)
    return default if value is None else value


def lane_quota(snake_cfg) -> tuple[int, int]:
    """(batches per subject, bytes per message) of flux-msg for a `[snake]` section: the
    count `snake.lane_max_msgs_per_subject` (0 = no per-subject quota), lowered, when
    `snake.lane_subject_share` is set, to `stream_max_bytes * share // lane_max_msg_bytes`
    (at least 1), and `snake.lane_max_msg_bytes`. Their product bounds what one subject holds."""
    max_msg = int(_cfg(snake_cfg, "lane_max_msg_bytes", LANE_MAX_MSG_BYTES))
    per_subject = int(_cfg(snake_cfg, "lane_max_msgs_per_subject", DEFAULT_LANE_MAX_MSGS_PER_SUBJECT))
    share = float(_cfg(snake_cfg, "lane_subject_share", 0.0))
    cap = int(snake_cfg.stream_max_bytes)
    if share > 0 and cap > 0:
        bound = max(1, int(cap * share) // max_msg)
        per_subject = min(per_subject, bound) if per_subject else bound
    return per_subject, max_msg


def msg_stream_config(snake_cfg, replicas: int = NUM_REPLICAS):
    """The StreamConfig of flux-msg for a `[snake]` section (see the module docstring)."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

    per_subject, max_msg = lane_quota(snake_cfg)
    max_age = float(_cfg(snake_cfg, "lane_undelivered_max_age", 0.0) or 0.0)
    return StreamConfig(
        name=S.STREAM_MSG,
        description="fluxrig guaranteed lane: removed only once consumed (fluxrig-mixer)",
        subjects=[S.msg_all()],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.NEW,
        max_age=max_age,
        max_bytes=int(snake_cfg.stream_max_bytes),
        max_msgs_per_subject=per_subject if per_subject > 0 else -1,
        discard_new_per_subject=per_subject > 0,
        max_msg_size=min(max_msg, int(snake_cfg.stream_max_bytes)) if snake_cfg.stream_max_bytes > 0 else max_msg,
        # JetStream refuses a duplicate window longer than max_age
        duplicate_window=min(DUPLICATE_WINDOW_S, max_age) if max_age else DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


def telemetry_stream_config(snake_cfg, replicas: int = NUM_REPLICAS):
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

    return StreamConfig(
        name=S.STREAM_TELEMETRY,
        subjects=[S.telemetry_all()],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.NEW,  # archive: the ingest purges what it acked
        max_age=snake_cfg.telemetry_max_age,
        max_bytes=snake_cfg.telemetry_max_bytes,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


def audit_stream_config(max_age: float, max_bytes: int, replicas: int = NUM_REPLICAS):
    """The StreamConfig of fluxrig-audit, the operators' audit trail every node reads
    (api/shared_audit.py). Limits retention, discard OLD: past `max_age` or `max_bytes` the
    oldest rows leave the shared trail (each node's DuckDB keeps the rows it served)."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

    return StreamConfig(
        name=S.STREAM_AUDIT,
        description="fluxrig operators' audit trail, shared by the Mixer nodes (fluxrig-mixer)",
        subjects=[S.MIXER_AUDIT],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_age=max_age,
        max_bytes=max_bytes,
        duplicate_window=DUPLICATE_WINDOW_S,  # a row re-sent after a lost ack is dropped by its id
        num_replicas=replicas,
    )


#: How long a group's saga mirror keeps a silent member's last word: a member gone for a month
#: still has its owed reversals claimable (a live member restates its subject every minute).
SAF_MAX_AGE_S = 60 * 86400.0
SAF_MAX_BYTES = 1 << 30


def saf_stream_config(group: str, replicas: int = NUM_REPLICAS):
    """The StreamConfig of `fluxrig-saf-<group>`, the group's saga mirrors (issue 17 item 4,
    fluxrig.saga.mirror). Limits retention, discard NEW (a full stream refuses a member's new
    events, which stay in its own journal, rather than evicting another member's owed
    reversals); rollups allowed (each member's checkpoint replaces its subject's history);
    direct gets (a claimer reads a silent member's subject message by message)."""
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

    return StreamConfig(
        name=S.saf_stream(group),
        description=f"fluxrig saga mirrors of Rack group {group} (fluxrig-mixer)",
        subjects=[S.saf_subjects(group)],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.NEW,
        max_age=SAF_MAX_AGE_S,
        max_bytes=SAF_MAX_BYTES,
        allow_rollup_hdrs=True,
        allow_direct=True,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


async def ensure_stream(js, config) -> None:
    """Create `config`'s stream, or update the existing one in place (JetStream keeps its messages)."""
    import nats

    try:
        await js.stream_info(config.name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(config)
            return
        except nats.js.errors.BadRequestError as exc:
            # Cluster nodes starting together: another one created it first (10058).
            if getattr(exc, "err_code", None) != STREAM_NAME_IN_USE:
                raise
    await js.update_stream(config)


async def _keep_unconsumed(js, config) -> None:
    """Raise `config`'s per-subject count to what a subject of the existing flux-msg holds:
    JetStream trims a subject's oldest messages when the count is lowered below it, and those
    are unconsumed messages whose senders were acknowledged (see the module docstring)."""
    import nats

    if not config.max_msgs_per_subject or config.max_msgs_per_subject < 0:
        return
    try:
        info = await js.stream_info(config.name, subjects_filter=S.msg_all())
    except nats.js.errors.NotFoundError:
        return
    held = max((info.state.subjects or {}).values(), default=0)
    if held > config.max_msgs_per_subject:
        log.warning(
            "flux-msg: a source holds %d unconsumed batches, more than the new per-subject quota %d; "
            "keeping %d until it drains (lowering it now would delete acknowledged messages)",
            held,
            config.max_msgs_per_subject,
            held,
        )
        config.max_msgs_per_subject = held


async def ensure_streams(js, snake_cfg, replicas: int = NUM_REPLICAS) -> None:
    """Create or update the two streams: flux-msg (guaranteed lane) and flux-telemetry, with
    `replicas` copies each (replicas_for)."""
    msg = msg_stream_config(snake_cfg, replicas)
    await _keep_unconsumed(js, msg)
    for config in (msg, telemetry_stream_config(snake_cfg, replicas)):
        await ensure_stream(js, config)
    per_subject, max_msg = lane_quota(snake_cfg)
    cap = int(snake_cfg.stream_max_bytes)
    if cap > 0 and per_subject > 0 and per_subject * max_msg >= cap:
        (log.info if per_subject == DEFAULT_LANE_MAX_MSGS_PER_SUBJECT else log.warning)(
            "snake.lane_max_msgs_per_subject = %d x snake.lane_max_msg_bytes = %d reaches snake.stream_max_bytes "
            "= %d: one source port can fill the guaranteed lane and push every other Rack back (snake.lane_subject_share "
            "= 0.25 bounds each port to a quarter of it, at the cost of push-back above ~60 batches/s)",
            per_subject,
            max_msg,
            cap,
        )
    if _cfg(snake_cfg, "stream_max_age", 0.0):
        log.warning("snake.stream_max_age is ignored for flux-msg: delivered messages are removed once consumed, "
                    "undelivered ones are kept (see snake.lane_undelivered_max_age)")  # fmt: skip
    if _cfg(snake_cfg, "lane_undelivered_max_age", 0.0):
        log.warning(
            "snake.lane_undelivered_max_age = %gs: guaranteed-lane messages not consumed within it are deleted "
            "by JetStream although their senders were acknowledged (a receiver away longer loses them)",
            float(snake_cfg.lane_undelivered_max_age),
        )
