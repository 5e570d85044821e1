"""The incident manager's decisions: surges in, incident lifecycle events out (pure).

Related surges — those that start within ``merge.window_s`` of a group's latest surge
activity — form one group. A group becomes an incident the moment the declaration
policy (``incident_policy.toml``) holds for it: wide impact, other teams needed, or still
unresolved after an hour; or when a person declares it. Every transition is an
:class:`IncidentEvent` with a reason a person can read:

    declared ─▶ updated (a surge joins, or comes back) ─▶ mitigated (every surge ended)
        │                                                      │ cool-down at baseline
        └─▶ escalated (unresolved after an hour)               ▼
                                                            resolved (the end is announced)

Time is event time (the surge detector's watermark), so a replay decides as live traffic
would. Incident ids derive from the root key and the first surge's start, so a worker that
restarts and re-reads its input declares the same incident again under the same id and
sequence — an identical record, not a second incident.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec

from supportlens.contracts import DIMENSIONS, IncidentCommand, IncidentEvent, Severity, SurgeEvent
from supportlens.errors import UserError
from streams.suspects import SuspectRules

DEFAULT_POLICY_PATH = Path(__file__).with_name("incident_policy.toml")
SEVERITIES: tuple[Severity, ...] = ("sev1", "sev2", "sev3", "sev4")


class DeclareRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    wide_impact_users: int
    wide_impact_share: float
    other_teams_min: int
    sre_team: str
    unresolved_after_s: int
    floor_users: int
    advice_classes: list[str] = []


class MergeRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    window_s: int


class ResolveRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cooldown_s: int


class SeverityRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sev2_users: int
    sev1_users: int


class RootRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    priority: list[str]
    cover_share: float = 0.9


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    declare: DeclareRules
    merge: MergeRules
    resolve: ResolveRules
    severity: SeverityRules
    root: RootRules
    suspects: SuspectRules = SuspectRules()


def load_policy(path: Path = DEFAULT_POLICY_PATH) -> Policy:
    """Read and validate a policy file; a mistake is a :class:`UserError` naming the field."""
    try:
        policy = msgspec.convert(tomllib.loads(path.read_text()), Policy)
    except FileNotFoundError:
        raise UserError(f"incident policy {path} does not exist", hint="check --policy") from None
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise UserError(f"incident policy {path} is invalid: {exc}",
                        hint="compare it with streams/incident_policy.toml") from None
    unknown = [d for d in policy.root.priority if d not in DIMENSIONS]
    if unknown:
        raise UserError(f"incident policy {path}: unknown dimensions in root.priority: {', '.join(unknown)}",
                        hint=f"dimensions are {', '.join(DIMENSIONS)}")
    if not 0 < policy.root.cover_share <= 1:
        raise UserError(f"incident policy {path}: root.cover_share is {policy.root.cover_share}, "
                        "a share of the incident's users", hint="give a number above 0 and at most 1, e.g. 0.9")
    return policy


class SurgeRef(msgspec.Struct, kw_only=True):
    """What an incident group knows of one of its surges."""

    surge_id: str
    dimension: str
    value: str
    started_at_us: int
    ended_at_us: int | None = None
    quiet_since_us: int = 0  # start of the quiet buckets that ended it
    affected_users: int = 0
    active_users: int = 0


class Incident(msgspec.Struct, kw_only=True):
    incident_id: str
    state: Literal["candidate", "declared", "mitigated", "resolved"] = "candidate"
    started_at_us: int
    last_activity_us: int
    last_join_us: int = 0  # start of the latest surge that joined
    last_event_us: int = 0  # at_us of its latest transition
    surges: dict[str, SurgeRef] = {}  # by "dimension=value"
    sequence: int = 0
    severity: Severity = "sev3"
    title: str = ""
    root_key: str = ""
    manual_dimensions: dict[str, str] = {}
    declared_by: str = "policy"
    mitigated_at_us: int | None = None
    escalated: bool = False
    drill: bool = False


class BookState(msgspec.Struct, kw_only=True):
    incidents: list[Incident] = []
    now_us: int = 0  # event time of real traffic
    drill_now_us: int = 0  # drills have their own
    manual_count: int = 0
    silenced: list[str] = []  # surges of incidents a person resolved: they join nothing until they end


TeamOf = Callable[[str], str]


class IncidentBook:
    """The incident manager's state and its decisions; methods return the events to publish."""

    def __init__(self, policy: Policy, team_of: TeamOf, state: BookState | None = None) -> None:
        self.policy = policy
        self.team_of = team_of
        self.state = state or BookState()

    # ---- inputs ------------------------------------------------------------------------
    def on_surges(self, events: list[SurgeEvent]) -> list[IncidentEvent]:
        """The surge events of one closed bucket (one ``at_us``): all are taken in before any
        decision, so an outage that shows in ten dimensions at once is judged as one."""
        touched: dict[str, tuple[Incident, list[str], bool]] = {}  # id → (incident, joined keys, came back)
        drill = bool(events) and events[0].drill
        at_us = self._now(drill)
        for event in events:
            at_us = max(at_us, event.at_us)
            found = self._absorb(event)
            if found is None:
                continue
            incident, joined = found
            _, keys, back = touched.get(incident.incident_id, (incident, [], False))
            back = back or (incident.state == "mitigated" and event.phase != "end")
            touched[incident.incident_id] = (incident, keys + ([f"{event.dimension}={event.value}"] if joined else []), back)
        self._set_now(drill, at_us)
        out: list[IncidentEvent] = []
        for incident, joined, back in touched.values():
            if incident.state == "candidate":
                reason = self._declaration_reason(incident, at_us)
                if reason:
                    out.append(self._declare(incident, at_us, reason, "policy"))
            elif back:
                incident.state = "declared"
                incident.mitigated_at_us = None
                out.append(self._transition(incident, "updated", at_us, "failures surge again before the cool-down "
                                            "ended: " + _listing(joined or _active_keys(incident))))
            elif incident.state == "declared" and joined:
                out.append(self._transition(incident, "updated", at_us,
                                            "surging too: " + _listing(joined) + self._refine_root(incident)))
            elif incident.state == "declared" and _more_severe(self._severity(incident), incident.severity):
                out.append(self._transition(incident, "updated", at_us,
                                            f"{_users(incident)} users affected now: {self._severity(incident)}"))
            if incident.state == "declared" and not self._active(incident):
                incident.state = "mitigated"
                incident.mitigated_at_us = max(r.quiet_since_us for r in incident.surges.values())
                out.append(self._transition(
                    incident, "mitigated", at_us,
                    f"every surge is back at baseline; the incident resolves after {self.policy.resolve.cooldown_s} s "
                    "at baseline without a new surge"))
        return out

    def _absorb(self, event: SurgeEvent) -> tuple[Incident, bool] | None:
        """Attach one surge event to its group; the group, and whether the surge just joined it."""
        key = f"{event.dimension}={event.value}"
        if event.surge_id in self.state.silenced:
            if event.phase == "end":
                self.state.silenced.remove(event.surge_id)
            return None
        incident = self._owner(key, event.surge_id) if event.phase != "start" else None
        if incident is None:
            if event.phase == "end":
                return None  # a surge whose group is gone (resolved by a person, or forgotten)
            incident = self._group_for(event)
        ref = incident.surges.get(key)
        joined = ref is None or ref.surge_id != event.surge_id
        if ref is None or joined:
            ref = incident.surges[key] = SurgeRef(surge_id=event.surge_id, dimension=event.dimension,
                                                  value=event.value, started_at_us=event.started_at_us)
            incident.last_join_us = max(incident.last_join_us, event.started_at_us)
        ref.affected_users = max(ref.affected_users, event.affected_users)
        ref.active_users = max(ref.active_users, int(event.attributes.get("active_users", 0) or 0))
        ref.ended_at_us = event.at_us if event.phase == "end" else None
        ref.quiet_since_us = int(event.attributes.get("quiet_since_us", event.at_us) or event.at_us)
        incident.last_activity_us = max(incident.last_activity_us, event.at_us)
        return incident, joined

    def _now(self, drill: bool) -> int:
        return self.state.drill_now_us if drill else self.state.now_us

    def _set_now(self, drill: bool, now_us: int) -> None:
        if drill:
            self.state.drill_now_us = max(self.state.drill_now_us, now_us)
        else:
            self.state.now_us = max(self.state.now_us, now_us)

    def on_time(self, now_us: int, drill: bool = False) -> list[IncidentEvent]:
        """Event time (of real traffic, or of drills) moved to ``now_us``: escalate, resolve, forget."""
        self._set_now(drill, now_us)
        now = self._now(drill)
        rules = self.policy
        out: list[IncidentEvent] = []
        for incident in self.state.incidents:
            if incident.drill != drill:
                continue
            # each decision is stamped with the event time at which its rule came true, not with
            # ``now``: after a quiet stretch the watermark may jump far ahead in one step
            unresolved_at = incident.started_at_us + rules.declare.unresolved_after_s * 1_000_000
            if incident.state == "candidate":
                # the floor holds for this rule too: a handful of users is a support case, however long
                if self._active(incident) and now >= unresolved_at and _users(incident) >= rules.declare.floor_users \
                        and not self._advice_only(incident):
                    out.append(self._declare(incident, self._at(incident, unresolved_at), f"a surge is still unresolved "
                                             f"after {rules.declare.unresolved_after_s // 60} minutes", "policy"))
            elif incident.state == "declared" and not incident.escalated and now >= unresolved_at \
                    and (self._active(incident) or incident.manual_dimensions):
                incident.escalated = True
                incident.severity = _raise(incident.severity)
                out.append(self._transition(incident, "escalated", self._at(incident, unresolved_at),
                                            f"unresolved after {rules.declare.unresolved_after_s // 60} minutes"))
            elif incident.state == "mitigated" and incident.mitigated_at_us is not None \
                    and now >= (over_at := incident.mitigated_at_us + rules.resolve.cooldown_s * 1_000_000):
                incident.state = "resolved"
                at = self._at(incident, over_at)
                out.append(self._transition(
                    incident, "resolved", at,
                    f"rates stayed at baseline for {rules.resolve.cooldown_s} s after the last surge ended: the incident is over",
                    resolved_at_us=at))
        # forget what can no longer change: resolved incidents, and groups that never became one
        window_us = rules.merge.window_s * 1_000_000
        self.state.incidents = [
            i for i in self.state.incidents
            if not (i.state == "resolved" or (i.drill == drill and i.state == "candidate" and not self._active(i)
                                              and now - i.last_activity_us > window_us))
        ]
        return out

    def on_command(self, command: IncidentCommand) -> list[IncidentEvent]:
        """A person declared or resolved an incident."""
        at = max(command.at_us, self.state.now_us)
        if command.action == "declare":
            self.state.manual_count += 1
            digest = stable_digest(f"manual:{command.by}:{command.at_us}:{self.state.manual_count}")
            incident = Incident(incident_id=f"inc-{digest}", started_at_us=at, last_activity_us=at,
                                manual_dimensions=dict(command.dimensions), title=command.title)
            self.state.incidents.append(incident)
            event = self._declare(incident, at, command.reason or "declared by a person", command.by)
            if command.severity is not None and command.severity != incident.severity:
                incident.severity = command.severity
                event = msgspec.structs.replace(event, severity=command.severity)
            return [event]
        incident = next((i for i in self.state.incidents if i.incident_id == command.incident_id), None)
        if incident is None or incident.state in ("candidate", "resolved"):
            return []
        incident.state = "resolved"
        self.state.silenced.extend(r.surge_id for r in incident.surges.values() if r.ended_at_us is None)
        return [self._transition(incident, "resolved", at, f"resolved by {command.by}"
                                 + (f": {command.reason}" if command.reason else ""), resolved_at_us=at)]

    # ---- queries ------------------------------------------------------------------------
    def open_incidents(self) -> list[Incident]:
        return [i for i in self.state.incidents if i.state in ("declared", "mitigated")]

    # ---- decisions --------------------------------------------------------------------------
    def _owner(self, key: str, surge_id: str) -> Incident | None:
        for incident in self.state.incidents:
            ref = incident.surges.get(key)
            if ref is not None and ref.surge_id == surge_id and incident.state != "resolved":
                return incident
        return None

    def _group_for(self, event: SurgeEvent) -> Incident:
        """The group a starting surge joins: the incident whose users it mostly hits, a person's
        incident that names it, an incident in its cool-down that it was part of, a group whose
        latest surge started within the merge window, else a new group."""
        window_us = self.policy.merge.window_s * 1_000_000
        live = [i for i in self.state.incidents if i.state != "resolved"]
        key = f"{event.dimension}={event.value}"
        related = event.attributes.get("related_incident")
        for incident in live:
            if incident.incident_id == related:
                return incident  # its users are mostly this incident's (see SurgeEngine._relate)
            if incident.manual_dimensions.get(event.dimension) == event.value and incident.drill == event.drill:
                return incident
            if incident.state == "mitigated" and key in incident.surges and incident.drill == event.drill:
                return incident  # the same failure coming back during the cool-down re-opens it
        # Related: started within the window of the group's latest surge *start* (an outage shows
        # in its dimensions within a few buckets, while a surge starting long into one is another
        # story), unless its users say otherwise. Drills never merge with real incidents.
        unrelated = str(event.attributes.get("unrelated_incidents", "")).split()
        near = [i for i in live if not i.manual_dimensions and i.drill == event.drill
                and event.started_at_us - i.last_join_us <= window_us and i.incident_id not in unrelated]
        if near:
            return max(near, key=lambda i: i.last_join_us)
        digest = stable_digest(f"{'drill:' if event.drill else ''}{event.dimension}={event.value}:{event.started_at_us}")
        incident = Incident(incident_id=f"inc-{digest}", started_at_us=event.started_at_us,
                            last_activity_us=event.at_us, drill=event.drill)
        self.state.incidents.append(incident)
        return incident

    def _advice_only(self, incident: Incident) -> bool:
        """The group's surging classes are all the customers' own doing (``advice_classes``): they
        get advice (notices), the surges stay on record, and no rule declares it."""
        classes = {key.split("=", 1)[1] for key in incident.surges if key.startswith("diagnosis_class=")}
        return bool(classes) and classes <= set(self.policy.declare.advice_classes)

    def _declaration_reason(self, incident: Incident, now_us: int) -> str:
        """Which rule of the policy declares this group now; empty when none holds."""
        rules = self.policy.declare
        users = _users(incident)
        if users < rules.floor_users:
            return ""
        if self._advice_only(incident):
            return ""
        reasons = []
        share = max((r.affected_users / r.active_users for r in incident.surges.values() if r.active_users), default=0.0)
        if users >= rules.wide_impact_users:
            reasons.append(f"wide impact: {users} users affected (policy: {rules.wide_impact_users})")
        elif share >= rules.wide_impact_share:
            reasons.append(f"wide impact: {share:.0%} of the active users of {_widest(incident)} affected "
                           f"(policy: {rules.wide_impact_share:.0%})")
        teams = self._teams(incident)
        others = [t for t in teams if t != rules.sre_team]
        if len(teams) >= rules.other_teams_min:
            reasons.append(f"{len(teams)} teams needed: {', '.join(teams)}")
        elif others:
            reasons.append(f"team {others[0]} is needed, not only SRE (service {', '.join(self._services(incident))})")
        if self._active(incident) and (now_us - incident.started_at_us) / 1e6 >= rules.unresolved_after_s:
            reasons.append(f"unresolved after {rules.unresolved_after_s // 60} minutes")
        return "; ".join(reasons)

    def _declare(self, incident: Incident, at_us: int, reason: str, by: str) -> IncidentEvent:
        incident.state = "declared"
        incident.declared_by = by
        incident.severity = self._severity(incident)
        incident.root_key = self._root_key(incident)
        if not incident.title:
            incident.title = self._title(incident)
        return self._transition(incident, "declared", at_us, reason)

    def note(self, incident: Incident, reason: str) -> IncidentEvent:
        """An update that no surge brought (a change that became a suspect), at the book's time."""
        return self._transition(incident, "updated", max(self._now(incident.drill), incident.last_event_us), reason)

    def _refine_root(self, incident: Incident) -> str:
        """A surge that joins a declared incident may explain it better than the root chosen at
        the declaration: the dimensions of one outage cross their thresholds in different
        buckets (each against its own baseline), and the policy declares on the first that holds.
        The root (and the title naming it) follow the evidence; the incident id stays."""
        if incident.manual_dimensions:
            return ""
        root = self._root_key(incident)
        if root == incident.root_key:
            return ""
        was, incident.root_key = incident.root_key, root
        incident.title = self._title(incident)
        return f"; root cause now {root} (was {was})"

    @staticmethod
    def _at(incident: Incident, due_us: int) -> int:
        """When a timed rule fired: its due time, but never before the incident's last transition."""
        return max(due_us, incident.last_event_us)

    def _transition(self, incident: Incident, transition: str, at_us: int, reason: str,
                    resolved_at_us: int | None = None) -> IncidentEvent:
        incident.sequence += 1
        incident.last_event_us = max(incident.last_event_us, at_us)
        if transition in ("updated", "declared"):
            incident.severity = _max_severity(incident.severity, self._severity(incident))
        return IncidentEvent(
            incident_id=incident.incident_id,
            sequence=incident.sequence,
            transition=transition,  # type: ignore[arg-type]
            at_us=at_us,
            started_at_us=incident.started_at_us,
            resolved_at_us=resolved_at_us,
            severity=incident.severity,
            title=incident.title,
            reason=reason,
            root_key=incident.root_key or self._root_key(incident),
            dimensions=self._dimensions(incident),
            services=self._services(incident),
            teams=self._teams(incident),
            affected_users=_users(incident),
            declared_by=incident.declared_by,
            drill=incident.drill,
        )

    def _severity(self, incident: Incident) -> Severity:
        rules = self.policy.severity
        users = _users(incident)
        severity: Severity = "sev3"
        if users >= rules.sev1_users:
            severity = "sev1"
        elif users >= rules.sev2_users or len(self._teams(incident)) >= self.policy.declare.other_teams_min:
            severity = "sev2"
        return _raise(severity) if incident.escalated else severity

    def _dimensions(self, incident: Incident) -> dict[str, str]:
        """What the incident is about: the dimensions in which exactly one value surges, and
        whose surge covers at least half the users of the widest one (a lone app version that
        holds a third of an ISP's users is not what failed)."""
        if incident.manual_dimensions:
            return dict(incident.manual_dimensions)
        widest = _users(incident)
        values: dict[str, list[SurgeRef]] = {}
        for ref in incident.surges.values():
            values.setdefault(ref.dimension, []).append(ref)
        return {d: refs[0].value for d in DIMENSIONS
                if len(refs := values.get(d, [])) == 1 and 2 * refs[0].affected_users >= widest}

    def _root_key(self, incident: Incident) -> str:
        """The first dimension of the policy's priority whose lone surging value covers (nearly)
        all the incident's users. Coverage comes first: in a payment outage the most used app
        version surges alone too, with only its share of the users, and it is not what failed."""
        dimensions = self._dimensions(incident)
        widest = _users(incident)
        for dimension in self.policy.root.priority:
            if dimension not in dimensions:
                continue
            ref = incident.surges.get(f"{dimension}={dimensions[dimension]}")
            if ref is None or ref.affected_users >= self.policy.root.cover_share * widest:
                return f"{dimension}={dimensions[dimension]}"
        keys = sorted(incident.surges)
        return keys[0] if keys else "manual"

    def _title(self, incident: Incident) -> str:
        dimensions = self._dimensions(incident)
        what = dimensions.get("diagnosis_class", "failures").replace("_", " ")
        where = ", ".join(f"{d} {v}" for d, v in dimensions.items() if d != "diagnosis_class")
        return f"Surge of {what}" + (f" on {where}" if where else "")

    def _services(self, incident: Incident) -> list[str]:
        named = [v for d, v in self._dimensions(incident).items() if d == "service"]
        return sorted({r.value for r in incident.surges.values() if r.dimension == "service"} | set(named))

    def _teams(self, incident: Incident) -> list[str]:
        return sorted({self.team_of(s) for s in self._services(incident)})

    @staticmethod
    def _active(incident: Incident) -> bool:
        return any(r.ended_at_us is None for r in incident.surges.values())


def _users(incident: Incident) -> int:
    # the same users show in every dimension of an outage: the widest surge counts them all
    return max((r.affected_users for r in incident.surges.values()), default=0)


def _listing(keys: list[str], most: int = 6) -> str:
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


def _active_keys(incident: Incident) -> list[str]:
    return [key for key, ref in incident.surges.items() if ref.ended_at_us is None]


def _widest(incident: Incident) -> str:
    ref = max(incident.surges.values(), key=lambda r: r.affected_users / r.active_users if r.active_users else 0)
    return f"{ref.dimension} {ref.value}"


def _raise(severity: Severity) -> Severity:
    return SEVERITIES[max(0, SEVERITIES.index(severity) - 1)]


def _more_severe(a: Severity, b: Severity) -> bool:
    return SEVERITIES.index(a) < SEVERITIES.index(b)


def _max_severity(a: Severity, b: Severity) -> Severity:
    return a if SEVERITIES.index(a) <= SEVERITIES.index(b) else b


def stable_digest(text: str) -> str:
    """A short id part that is the same in every process and run (unlike ``hash()``)."""
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(BookState)


def dump_book(state: BookState) -> bytes:
    return _encoder.encode(state)


def load_book(data: bytes) -> BookState:
    return _decoder.decode(data)
