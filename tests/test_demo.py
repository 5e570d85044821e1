"""`supportlens demo` (what `make demo` runs) on real Kafka, a real `serve` and `notify`, and ClickHouse.

The day's outcome is checked from the demo's output files, against ground truth computed here
from its labels and the simulated world: which incidents were declared (and which not), how
early, whether each ended with an announcement, which VIP accounts were told (exactly those
whose users failed in the outage), and where the drill's notices went.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from helpers import settings_env, supportlens_cmd
from supportlens.demo import library_logs_to
from supportlens.simulator.labels import RequestLabel, read_labels, read_run
from supportlens.simulator.run import SimulateOptions, simulate
from supportlens.simulator.world import BAD_RELEASE, build_world
from supportlens.topics import provision
from streams.incidents import load_policy

pytestmark = pytest.mark.kafka
SCENARIOS = ("normal", "service-outage", "isp-outage", "bad-release", "misuse-wave", "quiet-night")
COOLDOWN_S = load_policy().resolve.cooldown_s


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _affected_vip_accounts(out: Path, outage: dict[str, Any], world) -> set[str]:
    """Ground truth: VIP accounts with a user whose request failed in the outage's window and part of the world."""
    users = {u.user_id: u for u in world.users}
    hit = {
        "service-outage": lambda label, user: label.failing_service == "payment",
        "isp-outage": lambda label, user: (user.region.name, user.isp.name) == ("cn-east", "China Telecom"),
        "bad-release": lambda label, user: user.app_version == BAD_RELEASE and user.platform == "android",
    }[outage["scenario"]]
    return {label.account_id for label in read_labels(out / f"{outage['scenario']}.labels.jsonl")
            if isinstance(label, RequestLabel) and label.expected_class != "ok"
            and outage["fault_start_us"] <= label.start_us < outage["fault_end_us"]
            and hit(label, users[label.user_id]) and label.account_id in world.vip_accounts}


def test_the_demo_day_declares_each_outage_tells_its_vips_stays_quiet_at_night_and_drills(settings, tmp_path):
    # an earlier demo was interrupted: its topics, records in them, are still on the broker
    leftover = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}demo.19990101000000."})
    provision(leftover)
    simulate(leftover, SimulateOptions("normal", 30, 10, speed=0, labels_path=tmp_path / "leftover.jsonl"))
    out = tmp_path / "demo"
    done = subprocess.run(supportlens_cmd("demo", "--out", str(out)), env=settings_env(settings),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    admin = AdminClient(settings.kafka_config())
    assert not [t for t in admin.list_topics(timeout=30).topics if t.startswith(leftover.topic_prefix)]
    assert "topics of earlier demo runs" in done.stdout

    # every scenario's records landed and were correlated (the part of the demo before incidents)
    for name in SCENARIOS:
        run = read_run(out / f"{name}.labels.jsonl")
        section = done.stdout.split(f"\n{name} (", 1)[1]
        assert f"{run.counts['server-spans']:,}" in section
        correlated, expected = map(_number, re.search(r"correlated ([\d,]+) of ([\d,]+) requests", section).groups())
        assert correlated == expected and run.visible_requests <= expected <= run.requests

    story = json.loads((out / "story.json").read_text())
    world = build_world(story["seed"], story["users"])
    incidents = _jsonl(out / "events" / "incidents.jsonl")
    notices = _jsonl(out / "events" / "notifications.jsonl")
    deliveries = _jsonl(out / "events" / "deliveries.jsonl")
    webhooks = _jsonl(out / "webhooks.jsonl")
    real = [e for e in incidents if not e.get("drill")]

    # the three outages, each its own incident on the right dimension, declared early, ended and announced
    outages = {o["scenario"]: o for o in story["outages"]}
    truths: dict[str, set[str]] = {}
    assert set(outages) == {"service-outage", "isp-outage", "bad-release"}
    for name, outage in outages.items():
        window = read_run(out / f"{name}.labels.jsonl").expected_incidents[0]
        assert (outage["fault_start_us"], outage["fault_end_us"]) == (window.start_us, window.end_us)
        events = [e for e in real if e["incident_id"] == outage["incident_id"]]
        declared = next(e for e in events if e["transition"] == "declared")
        assert declared.get("declared_by", "policy") == "policy" and declared["reason"]
        assert window.dimension.items() <= events[-1]["dimensions"].items(), (name, events[-1]["dimensions"])
        assert 0 <= declared["at_us"] - window.start_us <= 30_000_000, (name, declared["at_us"] - window.start_us)
        resolved = [e for e in events if e["transition"] == "resolved"]
        assert len(resolved) == 1 and 0 <= resolved[0]["at_us"] - window.end_us <= (COOLDOWN_S + 60) * 1_000_000

        # exactly the affected VIP accounts are told, once each, and each gets one follow-up
        truth = _affected_vip_accounts(out, outage, world)
        mine = [n for n in notices if n.get("incident_id") == outage["incident_id"]]
        told = Counter(n["account_id"] for n in mine if n["kind"] == "incident_declared")
        followed = Counter(n["account_id"] for n in mine if n["kind"] == "incident_resolved")
        assert truth and set(told) == truth, (name, sorted(truth - set(told)), sorted(set(told) - truth))
        assert set(told.values()) == {1} and followed == told
        truths[name] = truth
    # the payment outage hurts every VIP account; the ISP's leaves some unaffected, and they hear nothing
    assert truths["isp-outage"] < set(world.vip_accounts)

    # nothing else was declared by policy: not the misuse wave (advice instead), not the quiet night
    by_policy = {e["incident_id"] for e in real if e["transition"] == "declared" and e.get("declared_by", "policy") == "policy"}
    assert by_policy == {o["incident_id"] for o in outages.values()}
    night = read_run(out / "quiet-night.labels.jsonl")
    assert not [e for e in real if night.start_us <= e["started_at_us"] <= night.end_us]
    misuse = read_run(out / "misuse-wave.labels.jsonl")
    assert [n["account_id"] for n in notices if n["kind"] == "misuse_advice"] == [misuse.misuse_account]
    # a person declared one and resolved it
    manual = [e for e in real if e.get("declared_by", "policy") not in ("policy",)]
    assert [e["transition"] for e in manual] == ["declared", "resolved"] and manual[0]["dimensions"] == {"service": "search"}

    # every notice delivered; real ones to the customers' endpoint, drill ones only to the drill channel
    final = {d["notification_id"]: d["outcome"] for d in deliveries if d["outcome"] != "failed"}
    assert final and set(final.values()) == {"delivered"} and set(final) == {n["notification_id"] for n in notices}
    at = {endpoint: [w for w in webhooks if w["endpoint"] == endpoint] for endpoint in ("customer", "drill")}
    assert all(w["signature_ok"] for w in webhooks)
    assert {w["payload"]["notification_id"] for w in at["customer"]} == \
        {n["notification_id"] for n in notices if not n.get("drill")}
    drill_notices = {n["notification_id"] for n in notices if n.get("drill")}
    assert drill_notices and {w["payload"]["notification_id"] for w in at["drill"]} == drill_notices
    assert not any(w["payload"]["drill"] for w in at["customer"])
    drill_incidents = [e for e in incidents if e.get("drill") and e["transition"] == "declared"]
    assert drill_incidents and all(e["dimensions"].get("service") == "payment" for e in drill_incidents)
    for w in at["customer"]:
        assert w["path"] == f"/hooks/{w['payload']['account_id']}"

    # it ends by writing the day's complaint report, whose incidents are the day's
    [page] = list(out.glob("daily-*.en.html"))
    assert str(page) in done.stdout.replace("\n", "") and (out / page.name.replace(".html", ".md")).exists()
    text = page.with_suffix(".md").read_text(encoding="utf-8")
    assert all(o["incident_id"] in text for o in outages.values())
    manual_id = manual[0]["incident_id"]
    assert manual_id not in text  # declared today, not on the replayed day

    # the screen: one on-call's view per outage, the counts, and support's lookups
    assert "the day in counts" in done.stdout and "quiet-night: no incident" in done.stdout
    assert "signature verified" in done.stdout and "misuse-wave: no incident" in done.stdout
    # the integration's payment failures, each told the key reuse that caused them (the demo
    # fails when one is not traced to its own misuse: supportlens/demo/misuse.py)
    traced = done.stdout.split("misuse that fails elsewhere", 1)[1].split("\n\n", 1)[0]
    assert "later payment failures" in traced and "looked like server_error at payment" in traced
    lookup = done.stdout.split("supportlens lookup --ip", 1)[1]
    assert "report" in lookup and "server_error" in lookup and "payment" in lookup
    assert "call chain of" in lookup and "supportlens top --by service" in lookup
    assert "✗" not in done.stdout
    assert f"Kafka at {settings.kafka_bootstrap}" in done.stdout
    assert "GETPID" not in done.stdout + done.stderr and (out / "demo.log").exists()
    assert "…" not in done.stdout  # no cell cut (rich's mark), ids included


def test_the_demo_refuses_a_window_too_short_for_an_outage_to_end(settings, tmp_path):
    done = subprocess.run(supportlens_cmd("demo", "--window", "60", "--out", str(tmp_path)), env=settings_env(settings),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--window must be at least 240" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_library_warnings_go_to_the_demo_log_not_the_terminal(tmp_path, capfd):
    with library_logs_to(tmp_path / "demo.log"):
        logging.getLogger("supportlens.kafka").warning("GETPID [thrd:main]: Failed to acquire idempotence PID")
    logging.getLogger("supportlens.kafka").warning("after the demo")  # the handler is gone again
    assert "Failed to acquire idempotence PID" in (tmp_path / "demo.log").read_text()
    assert "after the demo" not in (tmp_path / "demo.log").read_text()
    assert "GETPID" not in capfd.readouterr().err


def _number(text: str) -> int:
    return int(text.replace(",", ""))
