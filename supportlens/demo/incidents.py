"""The incident half of the demo's day: what each outage came to, a person's incident, a drill.

Reads the pipeline's outputs from the topics (``surges``, ``incidents``, ``notifications``,
``deliveries``) and what the demo's webhook receivers got, prints what an on-call and a
customer would see, and returns every way the day differs from what the scenarios expect
(judged by :mod:`supportlens.demo.story`).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from supportlens.config import Settings
from supportlens.contracts import DeliveryAttempt, IncidentEvent, Notification, SurgeEvent, decode
from supportlens.demo.receiver import Received, WebhookReceiver
from supportlens.demo.story import Deliveries, OutageStory, mark, outage_problems, outage_story, unexpected_incidents
from supportlens.fit import fit
from supportlens.simulator.labels import RunLabel
from supportlens.support.access import RemoteSupport
from supportlens.topic_reader import read_range

EVENTS = {"surges": SurgeEvent, "incidents": IncidentEvent, "notifications": Notification,
          "deliveries": DeliveryAttempt}
MANUAL = {"title": "Search returns stale results for some users", "dimensions": {"service": "search"},
          "by": "demo on-call", "reason": "support sees a wave of tickets about search"}
WAIT_S = 150.0


def read_events(settings: Settings) -> dict[str, list[Any]]:
    """Everything the day wrote to ``surges``, ``incidents``, ``notifications`` and ``deliveries``."""
    return {name: [decode(m.value(), kind) for m in read_range(settings, [settings.topic(name)])]
            for name, kind in EVENTS.items()}


def wait_until(console: Console, status: str, check: Callable[[], Any], processes: Sequence[subprocess.Popen[bytes]],
          timeout_s: float = WAIT_S) -> Any:
    """``check()``'s first truthy answer, or its last answer when ``timeout_s`` passed or a process died."""
    deadline = time.monotonic() + timeout_s
    with console.status(status):
        while True:
            answer = check()
            if answer or time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                return answer
            time.sleep(1.0)


def incidents_of_the_day(settings: Settings, console: Console, runs: list[RunLabel], customers: WebhookReceiver,
                          processes: Sequence[subprocess.Popen[bytes]]) -> tuple[list[OutageStory], list[str]]:
    windows = [w for run in runs for w in run.expected_incidents]

    def settled() -> tuple[list[OutageStory], dict[str, list[Any]]] | None:
        events = read_events(settings)
        stories = [outage_story(w, events["incidents"], events["surges"], events["notifications"]) for w in windows]
        delivered = Deliveries.of(events["deliveries"])
        if all(s.resolved for s in stories) and not delivered.pending(events["notifications"]):
            return stories, events
        return None

    answer = wait_until(console, "waiting for the incidents to be declared, announced over and delivered…", settled,
                   processes)
    if answer is None:
        events = read_events(settings)
        stories = [outage_story(w, events["incidents"], events["surges"], events["notifications"]) for w in windows]
    else:
        stories, events = answer
    problems: list[str] = []
    by_notice = {r.payload.get("notification_id"): r for r in customers.received}
    for story in stories:
        _print_outage(console, story, by_notice)
        problems += outage_problems(story)
    night = next(run for run in runs if run.scenario == "quiet-night")
    unexpected = unexpected_incidents(events["incidents"], stories)
    at_night = [e for e in unexpected if night.start_us <= e.started_at_us <= night.end_us]
    if at_night:
        problems.append(f"quiet-night: {len(at_night)} incidents declared ({', '.join(e.root_key for e in at_night)})")
    else:
        surged = {f"{e.dimension}={e.value}" for e in events["surges"] if e.phase == "start" and not e.drill
                  and e.kind == "surge" and night.start_us <= e.started_at_us <= night.end_us}
        surges = f"{len(surged)} surges ({', '.join(sorted(surged))}), none the policy declares" if surged else "no surge"
        console.print(f"\n[bold cyan]quiet-night[/]: [green]no incident[/] ✓ — {_count(night.report_classes)} fault "
                      f"reports, {surges}")
    for event in unexpected:
        if event not in at_night:
            problems.append(f"an incident no outage explains: {event.incident_id} on {event.root_key} ({event.reason})")
    misuse = next((run for run in runs if run.scenario == "misuse-wave"), None)
    advice = [n for n in events["notifications"] if n.kind == "misuse_advice"]
    if misuse is not None:
        told = [n for n in advice if n.account_id == misuse.misuse_account]
        if told:
            console.print(f"\n[bold cyan]misuse-wave[/]: no incident; account {misuse.misuse_account} gets advice: "
                          f"[italic]{told[0].subject}[/]")
        else:
            problems.append(f"misuse-wave: account {misuse.misuse_account} got no advice")
    return stories, problems


def _count(classes: dict[str, int]) -> str:
    return f"{sum(classes.values()):,}"


def _print_outage(console: Console, story: OutageStory, by_notice: dict[Any, Any]) -> None:
    name = story.window.scenario
    expected = ", ".join(f"{k}={v}" for k, v in story.window.dimension.items())
    console.print(f"\n[bold magenta]{name}[/]: fault from {_hm(story.window.start_us)} to {_hm(story.window.end_us)} "
                  f"UTC on {expected}")
    if story.declared is None or story.latest is None:
        console.print(f"  [red]✗ no incident was declared[/]")
        return
    if story.surge is not None:
        s = story.surge
        console.print(f"  surge   {s.dimension}={s.value} at {_hm(s.at_us)}: score {s.score:.2f}, "
                      f"{s.affected_users} users affected, {s.rate_per_min:.0f}/min against {s.baseline_per_min:.1f}")
    after = story.declared_after_s or 0.0
    console.print(f"  declared [bold]{story.declared.incident_id}[/] ({story.declared.severity}) on {story.latest.root_key}, "
                  f"{after:.0f} s after the fault began {mark(0 <= after <= 30)}")
    console.print(f"    rule: {story.declared.reason}")
    console.print(f"  VIP accounts told: {len(story.told)}, each once {mark(max(story.told.values(), default=0) == 1)}")
    received = [r for r in by_notice.values() if r.payload.get("incident_id") == story.declared.incident_id
                and r.payload.get("kind") == "incident_declared"]
    if received:
        example = min(received, key=lambda r: r.payload.get("locale") != "zh-CN")  # a Chinese one if any
        console.print(f"    {example.payload['account_id']} ({example.payload['locale']}, signature "
                      f"{'verified' if example.signature_ok else 'WRONG'}) read: [italic]{example.payload['subject']}[/]")
        console.print(Padding(Text(example.payload["body"].strip()), (0, 0, 0, 6), expand=False))
    if story.resolved is None:
        console.print("  [red]✗ not resolved[/]")
        return
    console.print(f"  resolved {story.resolved_after_s:.0f} s after the fault ended: {story.resolved.reason}; "
                  f"{len(story.followed_up)} follow-ups {mark(set(story.followed_up) == set(story.told))}")


def _hm(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, timezone.utc).strftime("%H:%M:%S")


def person_declares(settings: Settings, console: Console) -> list[str]:
    """An on-call declares what no surge shows yet, then resolves it: both through the worker."""
    from supportlens.incident_desk import declare, resolve

    now = time.time_ns() // 1000
    declared = declare(settings, title=MANUAL["title"], dimensions=MANUAL["dimensions"], by=MANUAL["by"],
                       reason=MANUAL["reason"], severity=None, now_us=now)
    resolved = resolve(settings, declared.incident_id, by=MANUAL["by"], reason="fixed: the search index was rebuilt",
                       now_us=time.time_ns() // 1000)
    console.print(f"\n[bold]supportlens declare --service search --by '{MANUAL['by']}'[/]: declared "
                  f"[bold]{declared.incident_id}[/] ({declared.severity}): {declared.title}")
    console.print(f"[bold]supportlens resolve {declared.incident_id}[/]: {resolved.reason}")
    if declared.declared_by != MANUAL["by"] or resolved.transition != "resolved":
        return [f"the person-declared incident {declared.incident_id} went {resolved.transition}"]
    return []


def drill_the_outage(settings: Settings, console: Console, support: RemoteSupport, stories: list[OutageStory],
           customers: WebhookReceiver, drill_channel: WebhookReceiver,
           processes: Sequence[subprocess.Popen[bytes]]) -> list[str]:
    """Replay the payment outage from ClickHouse as a drill; its notices must reach the drill channel only."""
    from supportlens.drill import DrillOptions, run_drill
    from supportlens.store.lookup import LookupInputError

    story = next((s for s in stories if s.window.scenario == "service-outage" and s.resolved), None)
    if story is None or story.declared is None:
        return ["no drill: the payment outage was not recorded as a resolved incident"]
    incident_id = story.declared.incident_id

    def recorded() -> bool:
        try:
            return support.recorded_incident(incident_id).state == "resolved"
        except LookupInputError:
            return False

    if not wait_until(console, "waiting for ClickHouse to record the incident…", recorded, processes, 60):
        return [f"no drill: ClickHouse did not record {incident_id}"]
    customers_before = len(customers.received)
    summary = run_drill(settings, support, DrillOptions(incident_id, speed=0, lead_s=120, tail_s=10, drill_id="demo"))
    console.print(f"\n[bold]supportlens drill --incident {incident_id} --drill-id demo[/]: replayed "
                  f"{summary.counts.get('client-spans', 0) + summary.counts.get('server-spans', 0):,} spans and "
                  f"{summary.counts.get('fault-reports', 0):,} reports as drill {summary.drill_id}")

    def drilled() -> tuple[IncidentEvent, list[Notification]] | None:
        events = read_events(settings)
        declared = next((e for e in events["incidents"] if e.drill and e.transition == "declared"), None)
        if declared is None:
            return None
        notices = [n for n in events["notifications"] if n.incident_id == declared.incident_id]
        final = Deliveries.of(events["deliveries"])
        got = {r.payload.get("notification_id") for r in drill_channel.received}
        if notices and not final.pending(notices) and {n.notification_id for n in notices} <= got:
            return declared, notices
        return None

    answer = wait_until(console, "waiting for the drill's incident and its notices…", drilled, processes)
    if answer is None:
        return ["the drill declared no incident, or its notices did not reach the drill channel"]
    declared, notices = answer
    leaked = [r for r in customers.received[customers_before:] if r.payload.get("drill")]
    console.print(f"  drill incident [bold]{declared.incident_id}[/] on {declared.root_key}: {len(notices)} notices, "
                  f"all at the drill channel {mark(not leaked)}, none at a customer's endpoint")
    return [f"the drill sent {len(leaked)} notices to customers"] if leaked else []


def write_outputs(events: dict[str, list[Any]], out_dir: Path, stories: list[OutageStory],
                  customers: WebhookReceiver, drill_channel: WebhookReceiver, seed: int, users: int) -> None:
    """What the topics and the receivers hold, for a reader (or a test) to check against the labels."""
    events_dir = out_dir / "events"
    events_dir.mkdir(exist_ok=True)
    for name, records in events.items():
        (events_dir / f"{name}.jsonl").write_bytes(b"".join(msgspec.json.encode(r) + b"\n" for r in records))
    with (out_dir / "webhooks.jsonl").open("w", encoding="utf-8") as handle:
        for receiver, endpoint in ((customers, "customer"), (drill_channel, "drill")):
            for received in receiver.received:
                handle.write(json.dumps({"endpoint": endpoint, "path": received.path,
                                         "signature_ok": received.signature_ok, "payload": received.payload},
                                        ensure_ascii=False) + "\n")
    (out_dir / "story.json").write_text(json.dumps({"outages": [s.as_json() for s in stories], "seed": seed,
                                                    "users": users}, indent=2, ensure_ascii=False))


def print_counts(events: dict[str, list[Any]], console: Console, customers: WebhookReceiver,
                 drill_channel: WebhookReceiver) -> None:
    console.print("\n[bold]the day in counts[/] (topics surges, incidents, notifications, deliveries)")
    console.print(fit(day_counts_table(events, customers.received, drill_channel.received)))


def day_counts_table(events: dict[str, list[Any]], at_customers: Sequence[Received],
                     at_drill_channel: Sequence[Received]) -> Table:
    """The day's outputs counted, real traffic and drills apart (pure)."""
    incidents, notices = events["incidents"], events["notifications"]
    final = Deliveries.of(events["deliveries"]).final
    drill_of = {a.notification_id: a.drill for a in events["deliveries"]}
    table = Table("what", "real", "drill")
    rows = [
        ("surges started", [s for s in events["surges"] if s.phase == "start" and s.kind == "surge"]),
        ("canary findings (a version worse than its predecessor)",
         [s for s in events["surges"] if s.phase == "start" and s.kind == "canary"]),
        ("incidents declared by policy", [e for e in incidents if e.transition == "declared" and e.declared_by == "policy"]),
        ("incidents declared by a person", [e for e in incidents if e.transition == "declared" and e.declared_by != "policy"]),
        ("incidents resolved", [e for e in incidents if e.transition == "resolved"]),
        ("notices: incident declared", [n for n in notices if n.kind == "incident_declared"]),
        ("notices: incident resolved", [n for n in notices if n.kind == "incident_resolved"]),
        ("notices: misuse advice", [n for n in notices if n.kind == "misuse_advice"]),
    ]
    for what, items in rows:
        table.add_row(what, f"{sum(not i.drill for i in items):,}", f"{sum(i.drill for i in items):,}")
    for outcome in sorted(set(final.values())):
        ids = [nid for nid, got in final.items() if got == outcome]
        table.add_row(f"deliveries: {outcome}", f"{sum(not drill_of[i] for i in ids):,}",
                      f"{sum(drill_of[i] for i in ids):,}")
    table.add_row("webhooks received (signature verified)",
                  f"{sum(r.signature_ok for r in at_customers):,} of {len(at_customers):,}",
                  f"{sum(r.signature_ok for r in at_drill_channel):,} of {len(at_drill_channel):,}")
    return table
