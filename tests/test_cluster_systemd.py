"""The cluster node drop-in (systemd/fluxrig-mixer.service.d/cluster.conf) verifies with the Mixer
unit, and gives a node waiting for its quorum more than cluster.ready_timeout to start."""

from __future__ import annotations

import os
import re

from fluxrig_mixer.config import load_config
from test_systemd import MIXER_EXEC, MIXER_UNIT, UNITS, _an_executable, _seconds, _verify

CLUSTER_DROPIN = os.path.join(UNITS, "fluxrig-mixer.service.d", "cluster.conf")


def test_mixer_unit_with_cluster_dropin_verifies(tmp_path):
    _verify(tmp_path, MIXER_UNIT, MIXER_EXEC, _an_executable("fluxrig-mixer"), dropins=[CLUSTER_DROPIN])


def test_cluster_dropin_start_timeout_covers_the_quorum_wait():
    text = open(CLUSTER_DROPIN).read()
    start = _seconds(re.search(r"^TimeoutStartSec=(\S+)$", text, re.M).group(1))
    assert start > load_config(None, environ={}).cluster.ready_timeout + 30
