"""The switch Rack SIGKILLed at random moments under 500 TPS, 20 times, restarted each time: no
owed reversal is lost, no first attempt (0400) is sent twice, every saga ends answered.

The issuer (pyiso8583, not our codec) approves every 0200 and drops or answers late a share of
them; the acquirer behaves like a terminal: a request it never got an answer to is reversed by
the terminal itself (its own 0400, STANs from 900000), as card terminals do. At the end every
approval is either heard by the acquirer or reversed, and the switch's own reversals of an
original start with exactly one 0400."""

import asyncio
import os
import random
import signal
import subprocess
import sys

import iso8583
import pytest
from helpers import ROOT, free_port
from test_iso_authorizer import SPEC, request
from test_saga import Issuer

pytestmark = [pytest.mark.slow]

TPS = 500
TERMINAL_STAN0 = 900_000


def _scenario(tmp_path, port, issuer_port) -> str:
    with open(f"{ROOT}/scenarios/iso8583-switch.yaml") as fh:
        text = fh.read()
    text = (
        text.replace("${FLUXRIG_ISO_BIND:-0.0.0.0:8583}", f"127.0.0.1:{port}")
        .replace("${FLUXRIG_ISSUER_A:-127.0.0.1:8590}", f"127.0.0.1:{issuer_port}")
        .replace("${FLUXRIG_ISSUER_B:-127.0.0.1:8591}", f"127.0.0.1:{free_port()}")
        .replace("${FLUXRIG_SWITCH_TTL:-10s}", "300ms")
        .replace("${FLUXRIG_SAF_BACKOFF:-1s}", "200ms")
    )
    path = tmp_path / "switch.yaml"
    path.write_text(text)
    return str(path)


class Terminal:
    """The acquirer: sends `TPS` requests per second on one connection (reconnecting while the
    switch is down), records what it heard, and reverses what it never heard."""

    def __init__(self, port):
        self.port = port
        self.sent: dict[str, float] = {}
        self.heard: dict[str, str] = {}
        self.stan = 0
        self.stop = False

    async def run(self):
        loop = asyncio.get_running_loop()
        while not self.stop:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            reader = loop.create_task(self._read(r))
            t0, n0 = loop.time(), self.stan
            try:
                while not self.stop and not reader.done():
                    # Catch up with the rate (a busy machine oversleeps): TPS on average.
                    for _ in range(max(1, min(50, int((loop.time() - t0) * TPS) - (self.stan - n0)))):
                        self.stan += 1
                        stan = f"{self.stan:06d}"
                        self.sent[stan] = loop.time()
                        w.write(request("0200", stan))
                    await asyncio.sleep(1 / TPS)
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()
                reader.cancel()

    async def _read(self, r):
        try:
            while True:
                n = int.from_bytes(await r.readexactly(2), "big")
                doc, _ = iso8583.decode(await r.readexactly(n), SPEC)
                self.heard[doc["11"]] = doc.get("39", "")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return

    async def reverse_unanswered(self, issuer: Issuer):
        """Straight to the issuer, as the acquirer's own reversal would arrive there."""
        r, w = await asyncio.open_connection("127.0.0.1", issuer.port)
        n = 0
        for stan in self.sent:
            if stan in self.heard:
                continue
            n += 1
            doc = {
                "t": "0400",
                "7": "1127120000",
                "11": f"{TERMINAL_STAN0 + n:06d}",
                "41": "TERM0001",
                "4": "000000010000",
                "90": "0200" + stan + "1127120000" + "0" * 22,
            }
            raw, _ = iso8583.encode(doc, SPEC)
            w.write(len(raw).to_bytes(2, "big") + bytes(raw))
            await asyncio.wait_for(r.readexactly(int.from_bytes(await r.readexactly(2), "big")), 5)
        w.close()
        return n


def _spawn(conf: str, scenario: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fluxrig.cli.main", "run", "-c", conf, "--scenario", scenario],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.timeout(120)
async def test_switch_killed_5_times_under_load_owes_and_sends_every_reversal_once(tmp_path):
    await _killed_under_load(tmp_path, kills=5)


@pytest.mark.chaos
@pytest.mark.timeout(400)
async def test_switch_killed_20_times_under_load_owes_and_sends_every_reversal_once(tmp_path):
    await _killed_under_load(tmp_path, kills=20)


async def _killed_under_load(tmp_path, kills: int) -> None:
    port, issuer_port = free_port(), free_port()
    issuer = Issuer(issuer_port, drop=0.05, late=0.03, late_by=0.5, seed=8583)
    await issuer.start()
    state = tmp_path / "state"
    conf = tmp_path / "fluxrig.toml"
    conf.write_text(f'[base]\nname = "switch"\nstate_dir = "{state}"\n[logging]\nlevel = "warning"\n')
    scenario = _scenario(tmp_path, port, issuer_port)
    env = dict(os.environ, PYTHONPATH=ROOT)
    terminal = Terminal(port)
    rng = random.Random(16)
    load = asyncio.get_running_loop().create_task(terminal.run())
    proc = None
    try:
        for _ in range(kills):
            proc = _spawn(str(conf), scenario, env)
            before = len(terminal.heard)
            for _ in range(400):  # serving again (a busy box starts slowly)
                if len(terminal.heard) > before + 20:
                    break
                await asyncio.sleep(0.025)
            await asyncio.sleep(rng.uniform(0.05, 0.8))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        terminal.stop = True
        await asyncio.sleep(0.3)
        proc = _spawn(str(conf), scenario, env)  # the last run: drains what is owed

        def served() -> bool:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return True
            except OSError:
                return False

        saga_dir = state / "saga" / "switch"
        for _ in range(600):
            await asyncio.sleep(0.1)
            if _open_sagas(saga_dir) == 0 and served():
                break
        assert _open_sagas(saga_dir) == 0, "owed reversals still open after the last run"
        await terminal.reverse_unanswered(issuer)
    finally:
        terminal.stop = True
        load.cancel()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        await issuer.stop()
    assert len(terminal.sent) > kills * 200, len(terminal.sent)
    unreversed, doubled = [], []
    for (stan, _term), entry in issuer.ledger.items():
        if stan not in terminal.heard and not entry["reversals"]:
            unreversed.append(stan)
        firsts = [m for m in entry["reversals"] if m == "0400"]
        switch_firsts = len(firsts) - (1 if stan not in terminal.heard else 0)
        if switch_firsts > 1:
            doubled.append((stan, entry["reversals"]))
    assert not unreversed, f"approved, never heard by the acquirer, never reversed: {unreversed[:10]}"
    assert not doubled, f"a first attempt sent twice: {doubled[:5]}"
    switch_reversals = [r for r in issuer.reversals if int(r["stan"]) < TERMINAL_STAN0]
    assert switch_reversals
    # A request journaled but killed before it reached the issuer is reversed at restart (the
    # switch cannot know it was never written): answered 25, harmless, bounded by what was in
    # flight at each kill.
    unknown = {r["original"] for r in switch_reversals if not r["found"]}
    print(
        f"{len(terminal.sent)} requests, {len(issuer.ledger)} approved, {len(switch_reversals)} switch reversals, "
        f"{len(unknown)} of requests the issuer never saw"
    )
    assert len(unknown) <= kills * 16, len(unknown)
    heard_approved = [s for s, code in terminal.heard.items() if code == "00"]
    reversed_heard = [
        s
        for s in heard_approved
        if any(int(r["stan"]) < TERMINAL_STAN0 and r["original"][4:10] == s for r in issuer.reversals)
    ]
    # An approval the acquirer heard is never reversed by the switch (its ticket was closed
    # on disk before the reply went out), except a STAN reused by the terminal after wrapping.
    assert not reversed_heard, reversed_heard[:10]


def _open_sagas(saga_dir) -> int:
    from fluxrig.saga.store import read_journal

    try:
        folded = read_journal(str(saga_dir))
    except Exception:  # noqa: BLE001 (mid-write by the running Rack: try again)
        return -1
    return len(folded.sagas) + len(folded.tickets)
