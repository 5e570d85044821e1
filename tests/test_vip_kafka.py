"""VIP notifications on real Kafka with a real worker: an outage notifies exactly the VIP
accounts it affected (ground truth from the simulator's labels), each once in its locale,
with one follow-up when it resolves; unaffected VIP accounts and standard accounts hear nothing."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from helpers import WorkerProcess, replay_start
from supportlens.config import load_settings
from supportlens.contracts import IncidentEvent, Notification, decode
from supportlens.simulator.labels import RequestLabel, read_labels
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.simulator.world import build_world
from supportlens.topic_reader import read_range
from supportlens.topics import provision

pytestmark = pytest.mark.kafka
SEED, USERS, DURATION = 11, 3000, 300
ENDED_AGO_S = 180  # the run ended this long ago: its cool-down is behind the worker's clock once read
ENV = {"SUPPORTLENS_CORRELATION_GRACE_S": "2", "SUPPORTLENS_CORRELATION_SETTLE_S": "0.5",
       "SUPPORTLENS_SURGE_WARMUP_S": "60"}


def test_an_isp_outage_notifies_exactly_the_affected_vip_accounts_once_and_follows_up(kafka, tmp_path):
    settings = load_settings(kafka_bootstrap=kafka.bootstrap, topic_prefix=f"v{uuid.uuid4().hex[:8]}.", partitions=3)
    provision(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", **ENV).wait_ready()
    labels_path = tmp_path / "labels.jsonl"
    try:
        run = simulate(settings, SimulateOptions(
            "isp-outage", rate=50, duration_s=DURATION, seed=SEED, users=USERS, speed=0,
            start=replay_start(DURATION, ENDED_AGO_S), labels_path=labels_path))
        deadline = time.monotonic() + 150
        while not any(decode(m.value(), IncidentEvent).transition == "resolved"
                      for m in read_range(settings, [settings.topic("incidents")])):
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(1)
        time.sleep(2)  # the follow-ups are written in the same batch as the resolution
        notices = [decode(m.value(), Notification) for m in read_range(settings, [settings.topic("notifications")])]
    finally:
        worker.stop()

    world = build_world(SEED, USERS)
    isp_of = {u.user_id: (u.region.name, u.isp.name) for u in world.users}
    lo, hi = run.scenario_window
    truth = {label.account_id for label in read_labels(labels_path)
             if isinstance(label, RequestLabel) and label.expected_class != "ok" and lo <= label.start_us < hi
             and isp_of[label.user_id] == ("cn-east", "China Telecom") and label.account_id in world.vip_accounts}
    assert truth and truth != set(world.vip_accounts), "the scenario must leave some VIP accounts unaffected"

    declared = [n for n in notices if n.kind == "incident_declared"]
    resolved = [n for n in notices if n.kind == "incident_resolved"]
    assert {n.account_id for n in declared} == truth
    assert Counter(n.account_id for n in declared).most_common(1)[0][1] == 1, "an account was told twice"
    assert sorted(n.account_id for n in resolved) == sorted(truth), "one follow-up per notified account"
    assert not any(n.drill for n in notices)
    accounts = {a.account_id: a for a in world.accounts}
    for notice in declared:
        account = accounts[notice.account_id]
        assert notice.locale == account.locale and notice.channel == account.channel
        assert notice.to and notice.subject and notice.body
        if account.locale == "zh-CN":
            assert "网络" in notice.body and "China Telecom" in notice.body, notice.body
        else:
            assert "network China Telecom" in notice.body, notice.body
