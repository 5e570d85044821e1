"""The surge detector and incident manager as one state machine over ``incident-signals`` (pure).

Workers send partial counts and clocks (:mod:`streams.signals`); people send commands.
This engine sums the partials per dimension value and bucket, closes a bucket once every
live worker's clock has passed its end (the *watermark*), feeds each closed bucket to the
value's :class:`~streams.surge.SurgeDetector`, turns its readings into surge events, and
hands those to the :class:`~streams.incidents.IncidentBook`, which declares, updates,
escalates and resolves incidents.

- A partial for a bucket that is already closed (a worker that lagged) counts in the
  oldest open bucket: late, but never lost.
- A worker whose clock has not moved for ``idle_source_s`` wall seconds (stopped, or
  restarted under a new name) no longer holds the watermark back.
- A dimension value seen for the first time is scored against an empty past as long as
  the engine has watched (up to the detector's warm-up): a service that never failed
  before has a baseline of zero, which is the truth, and the floor keeps it sane.

The whole state is plain data (:class:`EngineState`), kept by the worker in a
changelog-backed table, so a restarted worker continues where it stopped.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from supportlens.contracts import (
    Account, Change, IncidentCommand, IncidentEvent, MisuseCount, Notification, SignalClock, SignalCount, SurgeEvent,
    VersionCount,
)
from streams.canary import Canary, CanaryParams, CanaryState, Finding
from streams.incidents import BookState, IncidentBook, Policy, TeamOf, stable_digest
from streams.notices import Notifier, NoticeState, vip_count
from streams import suspects
from streams.surge import DetectorState, DistinctSketch, Reading, SurgeDetector, SurgeParams


MAX_ACCOUNTS_PER_SURGE = 10_000
MAX_CHANGES = 2_000  # kept for suspects: the engine's core record must stay well under Kafka's 1 MB
RELATED_SHARE = 0.5  # a new surge whose users are mostly an incident's affected users joins it
UNRELATED_SHARE = 0.1  # … hardly any of them: it does not, even within the merge window


class OpenBucket(msgspec.Struct, kw_only=True):
    failed: int = 0
    reports: int = 0
    requests: int = 0
    users: list[int] = []
    active_users: list[int] = []
    accounts: list[str] = []


class KeyState(msgspec.Struct, kw_only=True):
    """One dimension value: its detector, its open buckets, the surge it is in."""

    dimension: str
    value: str
    drill: bool = False
    detector: DetectorState | None = None
    open: dict[int, OpenBucket] = {}
    surge_id: str = ""
    surge_started_us: int = 0
    surge_reports: int = 0
    surge_failed: int = 0
    surge_users: list[int] = []
    surge_active_users: list[int] = []
    surge_accounts: list[str] = []  # accounts with failures in the surge's active buckets
    last_accounts: list[str] = []  # of the bucket before: a surge's first evidence may precede its start bucket


class SourceClock(msgspec.Struct):
    watermark_us: int
    seen_wall_s: float


class Timeline(msgspec.Struct, kw_only=True):
    """One event time: real traffic has one, drills have their own."""

    sources: dict[str, SourceClock] = {}
    closed_until_us: int = 0  # every bucket before this is closed
    started_us: int = 0


class EngineState(msgspec.Struct, kw_only=True):
    keys: dict[str, KeyState] = {}
    real: Timeline = msgspec.field(default_factory=Timeline)
    drill: Timeline = msgspec.field(default_factory=Timeline)
    book: BookState = msgspec.field(default_factory=BookState)
    notices: NoticeState = msgspec.field(default_factory=NoticeState)
    latest: dict[str, IncidentEvent] = {}  # the latest transition of each open incident
    changes: dict[str, Change] = {}  # recent changes, by change id: the incidents' suspects
    canary: CanaryState = msgspec.field(default_factory=CanaryState)


@dataclass(frozen=True)
class EngineConfig:
    surge: SurgeParams = field(default_factory=SurgeParams)
    idle_source_s: float = 30.0
    sketch_k: int = 256
    canary: CanaryParams = field(default_factory=CanaryParams)


@dataclass
class Outputs:
    surges: list[SurgeEvent] = field(default_factory=list)
    incidents: list[IncidentEvent] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)

    def extend(self, other: Outputs) -> None:
        self.surges += other.surges
        self.incidents += other.incidents
        self.notifications += other.notifications


class SurgeEngine:
    def __init__(self, config: EngineConfig, policy: Policy, team_of: TeamOf, state: EngineState | None = None,
                 notifier: Notifier | None = None, accounts: Mapping[str, Account] | None = None) -> None:
        """``notifier`` writes customer notices (none without it); ``accounts`` is read, never
        copied, so a cache that fills it in the background is seen as it grows."""
        self.config = config
        self.state = state or EngineState()
        self.book = IncidentBook(policy, team_of, self.state.book)
        self.notifier = notifier
        if notifier is not None:
            notifier.state = self.state.notices
        self.accounts: Mapping[str, Account] = accounts if accounts is not None else {}
        self._bucket_us = config.surge.bucket_s * 1_000_000
        self._dirty: set[str] = set()
        self.canary = Canary(config.canary, self.state.canary, self._bucket_us)

    def take_dirty(self) -> set[str]:
        """The dimension values changed since the last call (to store just those)."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    # ---- inputs ---------------------------------------------------------------------------
    def on_count(self, signal: SignalCount) -> None:
        key = _key(signal.dimension, signal.value, signal.drill)
        self._dirty.add(key)
        entry = self.state.keys.get(key)
        if entry is None:
            entry = self.state.keys[key] = KeyState(dimension=signal.dimension, value=signal.value, drill=signal.drill)
        closed_until = self._time(signal.drill).closed_until_us
        late = signal.bucket_start_us < closed_until
        bucket = max(signal.bucket_start_us, closed_until)  # late: the oldest open bucket
        acc = entry.open.get(bucket)
        if acc is None:
            acc = entry.open[bucket] = OpenBucket()
        acc.failed += signal.failed
        if not late:
            # A report of a failure whose bucket has closed is news about the past: its user and
            # account still count as affected, but counted now it would only prolong a surge.
            acc.reports += signal.reports
        acc.requests += signal.requests
        acc.users = self._merge(acc.users, signal.users)
        acc.active_users = self._merge(acc.active_users, signal.active_users)
        if signal.accounts:
            acc.accounts = sorted(set(acc.accounts) | set(signal.accounts))

    def on_version(self, signal: VersionCount) -> None:
        self.canary.count(signal.target, signal.dimension, signal.version, signal.bucket_start_us, signal.requests,
                          signal.failed, signal.drill)

    def on_misuse(self, signal: MisuseCount) -> Outputs:
        if self.notifier is None:
            return Outputs()
        return Outputs(notifications=self.notifier.for_misuse(signal.account_id, signal.code, signal.count,
                                                              signal.at_us, self.accounts, signal.drill))

    def on_clock(self, signal: SignalClock, wall_s: float) -> Outputs:
        sources = self._time(signal.drill).sources
        known = sources.get(signal.source)
        sources[signal.source] = SourceClock(max(signal.watermark_us, known.watermark_us if known else 0), wall_s)
        return self.advance(wall_s, signal.drill)

    def on_command(self, command: IncidentCommand) -> Outputs:
        return self._with_notices(Outputs(incidents=self.book.on_command(command)))

    def on_change(self, change: Change) -> Outputs:
        """A deploy, config change, flag or infrastructure change (a repeat replaces it). An open
        incident it becomes a suspect of is updated with it, so one posted late still counts."""
        rules = self.book.policy.suspects
        self.state.changes[change.change_id] = change

        def since(drill: bool) -> int:
            """The earliest time a change may have started to explain an incident now or later
            (before the first clock of a timeline, there is no now: all are kept, up to the limit)."""
            now = self._time(drill).closed_until_us
            opened = [i.started_at_us for i in self.book.open_incidents() if i.drill == drill]
            return min(opened + [now]) - rules.window_s * 1_000_000 if now else 0

        self.state.changes = suspects.keep(self.state.changes, since, MAX_CHANGES)
        out = Outputs()
        for incident in self.book.open_incidents():
            latest = self.state.latest.get(incident.incident_id)
            if latest is None or latest.drill != change.drill or incident.state != "declared":
                continue
            ranked = suspects.rank(latest, self.state.changes.values(), rules)
            if ranked != latest.suspects and any(s.change_id == change.change_id for s in ranked):
                mine = next(s for s in ranked if s.change_id == change.change_id)
                out.incidents.append(self.book.note(incident, "suspect change: " + mine.reason))
        return self._with_notices(out)

    # ---- time ---------------------------------------------------------------------------------
    def _time(self, drill: bool) -> Timeline:
        return self.state.drill if drill else self.state.real

    def watermark(self, wall_s: float, drill: bool = False) -> int | None:
        live = [c.watermark_us for c in self._time(drill).sources.values()
                if wall_s - c.seen_wall_s <= self.config.idle_source_s]
        return min(live) if live else None

    def advance(self, wall_s: float, drill: bool = False) -> Outputs:
        """Close every bucket that ended before the watermark; decide on what they show."""
        watermark = self.watermark(wall_s, drill)
        out = Outputs()
        if watermark is None:
            return out
        limit = watermark - watermark % self._bucket_us  # buckets starting before this have ended
        time = self._time(drill)
        entries = [e for e in self.state.keys.values() if e.drill == drill]
        if not time.started_us:
            # partials that arrived before the first clock belong to buckets before it: close them too
            first = min((b for e in entries for b in e.open), default=limit)
            time.started_us = time.closed_until_us = min(limit, first)
        if limit <= time.closed_until_us:
            return out
        surges: list[SurgeEvent] = []
        for key, entry in self.state.keys.items():
            if entry.drill != drill:
                continue
            if any(b < limit for b in entry.open) or (entry.detector is not None and entry.detector.surging):
                self._dirty.add(key)  # _close changes exactly these
            surges += self._close(entry, limit)
        time.closed_until_us = limit
        surges.sort(key=lambda e: (e.at_us, e.phase != "start", e.dimension, e.value))
        for at_us, group in itertools.groupby(surges, key=lambda e: e.at_us):
            batch = [self._relate(event) if event.phase == "start" else event for event in group]
            out.surges += batch
            out.incidents += self.book.on_time(at_us, drill)
            out.incidents += self.book.on_surges(batch)
        out.incidents += self.book.on_time(limit, drill)
        # canary findings are surges of their own kind: on record and alerting, not incident evidence
        out.surges += [self._canary_event(f, limit, drill) for f in self.canary.evaluate(limit, drill, stable_digest)]
        return self._with_notices(out)

    def _canary_event(self, finding: Finding, at_us: int, drill: bool) -> SurgeEvent:
        verdict, c = finding.verdict, finding.comparison
        attributes: dict[str, str | int | float] = {
            "target": verdict.target, "version": verdict.version, "baseline_version": verdict.baseline,
            "diagnosis_class": verdict.cls}
        per_min = 60 / self.config.canary.window_s
        if c is not None:
            attributes |= {"failure_share": round(c.share, 5), "baseline_failure_share": round(c.baseline_share, 5),
                           "requests": c.requests, "baseline_requests": c.baseline_requests,
                           "p_value": float(f"{c.p_value:.3g}")}
        return SurgeEvent(
            surge_id=verdict.canary_id, phase=finding.phase, kind="canary",  # type: ignore[arg-type]
            at_us=at_us, started_at_us=verdict.started_at_us, dimension=verdict.dimension,
            value=verdict.target if verdict.dimension == "service" else verdict.version,
            score=round(1.0 - c.p_value, 6) if c else 0.0,
            rate_per_min=round(c.failures * per_min, 3) if c else 0.0,
            baseline_per_min=round(c.baseline_share * c.requests * per_min, 3) if c else 0.0,
            failed_requests=c.failures if c else 0,
            drill=drill, attributes=attributes)

    def _relate(self, event: SurgeEvent) -> SurgeEvent:
        """Compare a new surge's users with each live incident's affected users. Mostly theirs:
        the same incident, even long after it started (a release whose users sit behind a
        failing ISP surges once enough of them failed). Hardly any of theirs: another story,
        even within the merge window."""
        entry = self.state.keys.get(_key(event.dimension, event.value, event.drill))
        if entry is None or not entry.surge_users:
            return event
        related, related_share, unrelated = "", RELATED_SHARE, []
        for incident in self.book.state.incidents:
            if incident.drill != event.drill or incident.state == "resolved":
                continue
            theirs: list[int] = []
            for key in incident.surges:
                other = self.state.keys.get(_key(*key.split("=", 1), event.drill))
                if other is not None:
                    theirs = self._merge(theirs, other.surge_users)
            share = contained(entry.surge_users, theirs, self.config.sketch_k)
            if share is None:
                continue
            if share >= related_share:
                related, related_share = incident.incident_id, share
            elif share < UNRELATED_SHARE:
                unrelated.append(incident.incident_id)
        attributes = dict(event.attributes)
        if related:
            attributes["related_incident"] = related
        if unrelated:
            attributes["unrelated_incidents"] = " ".join(unrelated)
        return msgspec.structs.replace(event, attributes=attributes) if attributes != event.attributes else event

    # ---- customers ------------------------------------------------------------------------------
    def affected_accounts(self, incident_id: str) -> list[str]:
        """Accounts seen failing in the incident's root dimension value while it surged (the root
        is the most specific explanation: its failures are the incident's; a region that also
        surges holds other failures too)."""
        event = self.state.latest.get(incident_id)
        if event is None or "=" not in event.root_key:
            return []
        dimension, value = event.root_key.split("=", 1)
        entry = self.state.keys.get(_key(dimension, value, event.drill))
        return list(entry.surge_accounts) if entry is not None else []

    def _with_notices(self, out: Outputs) -> Outputs:
        """Count the affected accounts into each incident event, and write the notices it calls for:
        on its transitions, and for accounts newly affected while it is open."""
        annotated = []
        for event in out.incidents:
            ranked = suspects.rank(event, self.state.changes.values(), self.book.policy.suspects)
            if ranked:
                event = msgspec.structs.replace(event, suspects=ranked)
            self.state.latest[event.incident_id] = event
            affected = self.affected_accounts(event.incident_id)
            total, vips = vip_count(affected, self.accounts)
            event = msgspec.structs.replace(event, attributes={**event.attributes, "affected_accounts": total,
                                                               "affected_vip_accounts": vips})
            annotated.append(event)
            if self.notifier is not None:
                out.notifications += self.notifier.for_incident(event, affected, self.accounts)
            if event.transition == "resolved":
                del self.state.latest[event.incident_id]
        out.incidents = annotated
        if self.notifier is not None:
            told = {n.notification_id for n in out.notifications}
            for incident in self.book.open_incidents():
                event = self.state.latest.get(incident.incident_id)
                if event is not None and incident.state == "declared":
                    more = self.notifier.for_incident(event, self.affected_accounts(incident.incident_id), self.accounts)
                    out.notifications += [n for n in more if n.notification_id not in told]
        return out

    # ---- one dimension value ------------------------------------------------------------------
    def _close(self, entry: KeyState, limit: int) -> list[SurgeEvent]:
        due = sorted(b for b in entry.open if b < limit)
        surging = entry.detector is not None and entry.detector.surging
        if not due and not surging:
            return []  # nothing happened here: its detector catches up (zeros) when something does
        detector = self._detector(entry, due[0] if due else limit - self._bucket_us)
        events = []
        for bucket in due or [limit - self._bucket_us]:
            acc = entry.open.pop(bucket, OpenBucket())
            for reading in detector.observe(bucket, acc.failed + acc.reports):
                if reading.bucket_start_us == bucket:
                    self._accumulate(entry, reading, acc)
                if reading.phase != "quiet":
                    events.append(self._surge_event(entry, reading))
        if surging and due and due[-1] < limit - self._bucket_us:
            # a surging value that went silent: its quiet buckets are what ends the surge
            for reading in detector.observe(limit - self._bucket_us, 0):
                if reading.phase != "quiet":
                    events.append(self._surge_event(entry, reading))
        entry.detector = detector.state
        return events

    def _detector(self, entry: KeyState, first_bucket: int) -> SurgeDetector:
        detector = SurgeDetector(self.config.surge, entry.detector)
        if entry.detector is None:
            # A value never seen before: score it against the empty past the engine has watched.
            # A drill replays a past that was watched: its values are warm from the start.
            warmup = self.config.surge.warmup_buckets * self._bucket_us
            since = first_bucket - warmup if entry.drill else max(self.state.real.started_us, first_bucket - warmup)
            if since < first_bucket:
                detector.observe(since, 0)
        return detector

    def _accumulate(self, entry: KeyState, reading: Reading, acc: OpenBucket) -> None:
        phase = reading.phase
        if phase == "start":
            entry.surge_reports = entry.surge_failed = 0
            entry.surge_users, entry.surge_active_users = [], []
            entry.surge_accounts = list(entry.last_accounts)
        if phase in ("start", "update", "end"):
            entry.surge_reports += acc.reports
            entry.surge_failed += acc.failed
            entry.surge_users = self._merge(entry.surge_users, acc.users)
            entry.surge_active_users = self._merge(entry.surge_active_users, acc.active_users)
            if reading.score >= self.config.surge.end_score and len(entry.surge_accounts) < MAX_ACCOUNTS_PER_SURGE:
                # only buckets still above the quiet line: the tail of quiet buckets that ends a
                # surge holds the background noise, not the outage's victims
                entry.surge_accounts = sorted(set(entry.surge_accounts) | set(acc.accounts))
        entry.last_accounts = acc.accounts

    def _surge_event(self, entry: KeyState, reading: Reading) -> SurgeEvent:
        if reading.phase == "start":
            entry.surge_id = "s-" + stable_digest(f"{entry.dimension}={entry.value}@{reading.bucket_start_us}")
            entry.surge_started_us = reading.bucket_start_us
        per_min = 60 / self.config.surge.bucket_s
        return SurgeEvent(
            surge_id=entry.surge_id,
            phase=reading.phase,  # type: ignore[arg-type]
            at_us=reading.bucket_start_us + self._bucket_us,
            started_at_us=entry.surge_started_us,
            dimension=entry.dimension,
            value=entry.value,
            score=round(min(1.0, max(0.0, reading.score)), 4),
            rate_per_min=round(reading.count * per_min, 3),
            baseline_per_min=round(reading.baseline * per_min, 3),
            reports=entry.surge_reports,
            failed_requests=entry.surge_failed,
            affected_users=DistinctSketch(self.config.sketch_k, entry.surge_users).estimate(),
            drill=entry.drill,
            attributes=self._attributes(entry, reading),
        )

    def _attributes(self, entry: KeyState, reading: Reading) -> dict[str, int]:
        attributes = {"active_users": DistinctSketch(self.config.sketch_k, entry.surge_active_users).estimate()}
        if reading.phase == "end":
            # the cool-down counts from the first quiet bucket, not from when the quiet run was long enough
            quiet_s = self.config.surge.end_quiet_buckets * self.config.surge.bucket_s
            attributes["quiet_since_us"] = reading.bucket_start_us + self._bucket_us - quiet_s * 1_000_000
        return attributes

    def _merge(self, a: list[int], b: list[int]) -> list[int]:
        if not b:
            return a
        if not a:
            return sorted(b)[: self.config.sketch_k]
        return sorted(set(a) | set(b))[: self.config.sketch_k]


def contained(ours: list[int], theirs: list[int], k: int) -> float | None:
    """Estimated share of our users among theirs, from two K-minimum-values sketches: compared
    where their sketch is complete (below its largest kept hash); None when nothing compares."""
    if not ours or not theirs:
        return None
    limit = max(theirs) if len(theirs) >= k else None
    comparable = [h for h in ours if limit is None or h <= limit]
    if not comparable:
        return None
    known = set(theirs)
    return sum(h in known for h in comparable) / len(comparable)


def _key(dimension: str, value: str, drill: bool) -> str:
    return f"{'drill:' if drill else ''}{dimension}={value}"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(EngineState)
_key_decoder = msgspec.json.Decoder(KeyState)


def dump_engine(state: EngineState) -> bytes:
    return _encoder.encode(state)


def load_engine(data: bytes) -> EngineState:
    return _decoder.decode(data)


# The worker keeps the state in a changelog-backed table as one record per dimension value
# plus one for the rest, compressed: a single record grew past Kafka's 1 MB limit while a
# worker caught up on a backlog (every value then holds many open buckets of user sketches).

def pack_core(state: EngineState) -> bytes:
    """Everything but the dimension values (the timelines, the incident book, the notices)."""
    return zlib.compress(_encoder.encode(msgspec.structs.replace(state, keys={})), 1)


def pack_key(entry: KeyState) -> bytes:
    return zlib.compress(_encoder.encode(entry), 1)


def unpack_state(core: bytes | None, keys: dict[str, bytes]) -> EngineState:
    state = _decoder.decode(zlib.decompress(core)) if core is not None else EngineState()
    state.keys = {key: _key_decoder.decode(zlib.decompress(value)) for key, value in keys.items()}
    return state


def slim(entry: KeyState) -> KeyState:
    """The entry without the user and account detail of its open buckets (their counts stay):
    the last resort when even one value's record would be too large to store."""
    return msgspec.structs.replace(entry, open={b: msgspec.structs.replace(acc, users=[], active_users=[], accounts=[])
                                                for b, acc in entry.open.items()})
