"""Misuse that fails elsewhere (issue #18): the catalog's sequence rules over one user's steps.

Some misuse is refused nowhere: an order sent with an earlier order's idempotency key but
another body is answered with the earlier order, and it is the payment, minutes later, that
fails on an amount the client never saw. On its own that failure reads "our payment service
failed"; told apart, it is the catalogued misuse, and the user needs its advice.

The worker re-keys by user (``user-steps``, beside ``behaviour``) the requests a rule watches
and every diagnosed report a rule could explain; these pure functions keep one user's state:

* :func:`on_step` — a request or behaviour event; may detect a misuse (``reused_key`` and
  ``too_frequent`` at once; ``missing_precursor`` after a grace, :func:`on_due`, since the
  precursor may be read later than the request it precedes);
* :func:`on_report` — a diagnosed report; traced to the detection that explains it best
  (one whose requests it names, else the latest in reach), and kept: a detection read after
  the report still explains it, or explains it better.

A traced report is a newer version of the diagnosed report (``diagnosed_at_us`` later), so
it replaces the symptom's diagnosis downstream. Steps are deduplicated by request id: a
restarted worker that reads a step again detects nothing new. Consent: after a user
withdrew it, the behaviour they gave before is forgotten and none is used again; rules that
could only be judged with it (``missing_precursor``) no longer judge them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import msgspec

from supportlens.contracts import Diagnosis, DiagnosedReport, MisuseDetection, SequenceStep
from streams.catalog import Catalog, SequenceRule
from streams.diagnose import worded

WITHDRAWN = "consent_withdrawn"  # the behaviour event that withdraws consent
MAX_REPORTS = 50  # per user, reports held for a detection that may come
MAX_DETECTIONS = 50
MAX_POLLS = 500


class KeyUse(msgspec.Struct, array_like=True):
    value: str
    request_id: str
    at_us: int


class Precursor(msgspec.Struct, array_like=True):
    at_us: int
    behaviour: bool


class Candidate(msgspec.Struct, array_like=True):
    """A request without its precursor so far, judged once ``due_s`` (wall time) has passed."""

    rule: str
    request_id: str
    session_id: str
    at_us: int
    due_s: float
    drill: bool = False
    user_id: str = ""
    account_id: str = ""


class UserState(msgspec.Struct):
    """One user's sequence state (one record of the worker's ``sequences`` table)."""

    latest_us: int = 0  # the latest event time seen of this user
    withdrawn: bool = False
    keys: dict[str, dict[str, KeyUse]] = {}  # rule → key → its first use in the window
    precursors: dict[str, dict[str, Precursor]] = {}  # rule → session ("" for scope user) → latest
    polls: dict[str, list[tuple[int, str]]] = {}  # rule → calls (at µs, request id), in time order
    pending: list[Candidate] = []
    detections: list[MisuseDetection] = []
    reports: list[DiagnosedReport] = []  # as diagnosed (untraced): a detection read later may explain one
    traced: dict[str, str] = {}  # report id → the detection that explains it


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(UserState)


def pack(state: UserState) -> bytes:
    return _encoder.encode(state)


def unpack(value: bytes | None) -> UserState:
    return _decoder.decode(value) if value else UserState()


@dataclass
class Found:
    detections: list[MisuseDetection] = field(default_factory=list)
    reports: list[DiagnosedReport] = field(default_factory=list)  # traced: newer versions to emit

    def extend(self, other: Found) -> Found:
        self.detections.extend(other.detections)
        self.reports.extend(other.reports)
        return self


def user_key(user_id: str, account_id: str) -> str:
    """Whose steps these are: the user, or for an integration without users its account."""
    return user_id or (f"account:{account_id}" if account_id else "")


def watched(catalog: Catalog) -> tuple[frozenset[str], frozenset[str]]:
    """The operations (or behaviour events) any rule reads, and the attributes it reads of them."""
    names: set[str] = set()
    attributes = {"session_id"}
    for rule in catalog.sequences.values():
        names.add(rule.operation)
        if rule.precursor:
            names.add(rule.precursor)
        attributes.update(a for a in (rule.key, rule.value) if a)
    return frozenset(names), frozenset(attributes)


def explained_classes(catalog: Catalog) -> frozenset[str]:
    """The diagnosis classes a rule could trace to an earlier misuse: only their reports travel."""
    return frozenset(cls for rule in catalog.sequences.values() for cls in rule.surfaces_as)


def _clock(at_us: int) -> str:
    return datetime.fromtimestamp(at_us / 1e6, timezone.utc).strftime("%H:%M:%S")


def on_step(state: UserState, step: SequenceStep, catalog: Catalog, now_s: float) -> Found:
    """Take one request or behaviour event of this user (``now_s``, wall time, starts a grace)."""
    if step.behaviour:
        if step.name == WITHDRAWN:
            state.withdrawn = True
            for sessions in state.precursors.values():
                for session in [s for s, p in sessions.items() if p.behaviour]:
                    del sessions[session]
            state.pending = []  # judged without the behaviour they needed: not at all
            return Found()
        if state.withdrawn:
            return Found()  # consent withdrawn: never used again (the gateway stores none either)
    state.latest_us = max(state.latest_us, step.ts_us)
    found = Found()
    for name, rule in catalog.sequences.items():
        if rule.kind == "missing_precursor" and step.name == rule.precursor:
            _precursor(state, name, rule, step)
        if step.name != rule.operation or (step.behaviour and rule.kind != "missing_precursor"):
            continue
        if rule.kind == "reused_key":
            detection = _reused_key(state, name, rule, step)
        elif rule.kind == "too_frequent":
            detection = _too_frequent(state, name, rule, step)
        else:
            detection = _await_precursor(state, name, rule, step, now_s)
        if detection is not None:
            found.extend(_detected(state, detection, catalog, int(now_s * 1_000_000)))
    _prune(state, catalog, int(now_s * 1_000_000))
    return found


def on_due(state: UserState, catalog: Catalog, now_s: float) -> Found:
    """Judge the requests whose precursor had its grace to arrive."""
    found = Found()
    waiting = []
    for candidate in state.pending:
        rule = catalog.sequences.get(candidate.rule)
        if rule is None:
            continue  # the rule left the catalog
        if candidate.due_s > now_s:
            waiting.append(candidate)
        elif not _has_precursor(state, candidate.rule, rule, candidate.session_id, candidate.at_us):
            scope = f"in session {candidate.session_id}" if rule.scope == "session" else \
                f"in the {rule.window_s / 60:.0f} min before"
            found.extend(_detected(state, MisuseDetection(
                detection_id=f"{candidate.rule}:{candidate.request_id}", rule=candidate.rule, code=rule.code,
                user_id=candidate.user_id, account_id=candidate.account_id, at_us=candidate.at_us, request_id=candidate.request_id, session_id=candidate.session_id,
                evidence=f"{rule.operation} at {_clock(candidate.at_us)} without {rule.precursor} {scope}",
                drill=candidate.drill), catalog, int(now_s * 1_000_000)))
    state.pending = waiting
    return found


def on_report(state: UserState, report: DiagnosedReport, catalog: Catalog, now_us: int) -> Found:
    """Take one diagnosed report of this user: traced to the detection that explains it, if one
    does; else held for one that may be read later."""
    if report.diagnosis.misuse_detection_id:
        return Found()  # traced already (our own output, or a tracing worker before a restart)
    state.latest_us = max(state.latest_us, report.received_at_us)
    # kept, traced or not: a detection read later may explain it better (or at all)
    state.reports = [r for r in state.reports if r.report_id != report.report_id] + [report]
    state.reports = state.reports[-MAX_REPORTS:]
    _prune(state, catalog, now_us)
    detection = _best(state, report, catalog)
    if detection is None:
        return Found()
    # A report diagnosed again (its request learned more) is traced again: else its newer,
    # untraced version would replace the traced one downstream.
    state.traced[report.report_id] = detection.detection_id
    return Found(reports=[trace(report, detection, catalog, now_us)])


def pending_due(state: UserState) -> float | None:
    """When the earliest waiting request is due (wall seconds), if any waits."""
    return min((c.due_s for c in state.pending), default=None)


def trace(report: DiagnosedReport, detection: MisuseDetection, catalog: Catalog, now_us: int) -> DiagnosedReport:
    """The report told as the misuse it follows from, the symptom kept in the evidence."""
    seen = report.diagnosis
    after_s = max(0, report.received_at_us - detection.at_us) // 1_000_000
    evidence = (f"{detection.evidence}; {after_s // 60} min {after_s % 60} s later it surfaced as {seen.cls}"
                + (f" ({seen.evidence})" if seen.evidence else ""))
    diagnosis = Diagnosis(cls="client_misuse", service=seen.service, team=seen.team, code=detection.code,
                          evidence=evidence[:4096], catalog_version=catalog.version, surfaced_as=seen.cls,
                          misuse_detection_id=detection.detection_id)
    title, explanation, action, doc_url = worded(diagnosis, report.locale, catalog)
    return msgspec.structs.replace(report, diagnosis=diagnosis, title=title, explanation=explanation, action=action,
                                   doc_url=doc_url, diagnosed_at_us=max(now_us, report.diagnosed_at_us + 1))


# ---- the rules ---------------------------------------------------------------------------
def _reused_key(state: UserState, name: str, rule: SequenceRule, step: SequenceStep) -> MisuseDetection | None:
    key = step.attributes.get(rule.key)
    if key is None or key == "":
        return None
    key, value = str(key), str(step.attributes.get(rule.value, ""))
    uses = state.keys.setdefault(name, {})
    first = uses.get(key)
    window_us = int(rule.window_s * 1_000_000)
    if first is None or abs(step.ts_us - first.at_us) > window_us:
        uses[key] = KeyUse(value, step.request_id, step.ts_us)
        return None
    if first.request_id == step.request_id or first.value == value:
        return None  # the same request read again, or a retry of the identical request: as documented
    earlier, later = (first, KeyUse(value, step.request_id, step.ts_us))
    if later.at_us < earlier.at_us:  # read out of order: the one sent second is the misuse
        earlier, later = later, earlier
        uses[key] = earlier
    return MisuseDetection(
        detection_id=f"{name}:{later.request_id}", rule=name, code=rule.code, user_id=step.user_id,
        account_id=step.account_id, at_us=later.at_us, request_id=later.request_id,
        earlier_request_id=earlier.request_id, session_id=step.session_id,
        evidence=f"{rule.operation} at {_clock(later.at_us)} reused the {rule.key} {key[:16]} of request "
                 f"{earlier.request_id} ({_clock(earlier.at_us)}) with another {rule.value}",
        drill=step.drill)


def _too_frequent(state: UserState, name: str, rule: SequenceRule, step: SequenceStep) -> MisuseDetection | None:
    calls = state.polls.setdefault(name, [])
    if any(rid == step.request_id for _, rid in calls):
        return None
    calls.append((step.ts_us, step.request_id))
    calls.sort()
    horizon = state.latest_us - int(rule.count * rule.min_interval_s * 2_000_000)
    calls[:] = [c for c in calls if c[0] >= horizon][-MAX_POLLS:]
    gap_us = rule.min_interval_s * 1_000_000
    run_start = 0
    for i in range(1, len(calls)):
        if calls[i][0] - calls[i - 1][0] >= gap_us:
            run_start = i
        elif i - run_start + 1 >= rule.count:
            first_at, first_id = calls[run_start]
            at_us, request_id = calls[i]
            return MisuseDetection(
                # one detection per run of calls, however long it goes on
                detection_id=f"{name}:{first_id}", rule=name, code=rule.code, user_id=step.user_id,
                account_id=step.account_id, at_us=at_us, request_id=request_id, earlier_request_id=first_id,
                session_id=step.session_id,
                evidence=f"{rule.operation} called {rule.count} times from {_clock(first_at)} to {_clock(at_us)}, "
                         f"each less than {rule.min_interval_s:g} s after the one before",
                drill=step.drill)
    return None


def _precursor(state: UserState, name: str, rule: SequenceRule, step: SequenceStep) -> None:
    scope = step.session_id if rule.scope == "session" else ""
    if rule.scope == "session" and not scope:
        return
    sessions = state.precursors.setdefault(name, {})
    known = sessions.get(scope)
    if known is None or step.ts_us > known.at_us:
        sessions[scope] = Precursor(step.ts_us, step.behaviour)


def _has_precursor(state: UserState, name: str, rule: SequenceRule, session_id: str, at_us: int) -> bool:
    seen = state.precursors.get(name, {}).get(session_id if rule.scope == "session" else "")
    # the latest precursor is kept: one after the request does not tell whether one came before,
    # so it counts as present (never a false accusation)
    return seen is not None and (rule.scope == "session" or seen.at_us >= at_us - rule.window_s * 1_000_000)


def _await_precursor(state: UserState, name: str, rule: SequenceRule, step: SequenceStep,
                     now_s: float) -> MisuseDetection | None:
    if state.withdrawn or (rule.scope == "session" and not step.session_id) or not step.request_id:
        return None  # nothing to judge it by
    if any(c.rule == name and c.request_id == step.request_id for c in state.pending):
        return None
    if any(d.detection_id == f"{name}:{step.request_id}" for d in state.detections):
        return None
    if not _has_precursor(state, name, rule, step.session_id, step.ts_us):
        state.pending.append(Candidate(name, step.request_id, step.session_id, step.ts_us, now_s + rule.grace_s,
                                       step.drill, step.user_id, step.account_id))
    return None


# ---- detections and reports ----------------------------------------------------------------
def _detected(state: UserState, detection: MisuseDetection, catalog: Catalog, now_us: int) -> Found:
    if any(d.detection_id == detection.detection_id for d in state.detections):
        return Found()
    detection = msgspec.structs.replace(detection, detected_at_us=now_us)
    state.detections = (state.detections + [detection])[-MAX_DETECTIONS:]
    found = Found(detections=[detection])
    for report in state.reports:
        best = _best(state, report, catalog)
        if best is not None and state.traced.get(report.report_id) != best.detection_id:
            state.traced[report.report_id] = best.detection_id
            found.reports.append(trace(report, best, catalog, now_us))
    return found


def _best(state: UserState, report: DiagnosedReport, catalog: Catalog) -> MisuseDetection | None:
    """The detection that explains a report best: one whose requests the report names (the
    app lists the requests before the failure), else the latest that covers it. Episodes of
    one integration overlap: time alone would blame the wrong order."""
    named = set(report.request_ids)
    covering = [d for d in state.detections if _covers(d, report, catalog)]
    return max(covering, key=lambda d: (d.request_id in named or d.earlier_request_id in named, d.at_us),
               default=None)


def _covers(detection: MisuseDetection, report: DiagnosedReport, catalog: Catalog) -> bool:
    rule = catalog.sequences.get(detection.rule)
    if rule is None or detection.drill != report.drill:
        return False
    seen = report.diagnosis
    if seen.cls not in rule.surfaces_as or (rule.surfaces_in and seen.service not in rule.surfaces_in):
        return False
    return detection.at_us <= report.received_at_us <= detection.at_us + rule.surfaces_within_s * 1_000_000


def _prune(state: UserState, catalog: Catalog, wall_us: int) -> None:
    """Forget what no rule can use any more, by the user's own event time. Detections and reports
    also stay while they are recent in wall time: a backlog read fast (a replay, a worker catching
    up) brings this user's steps of hours later before the reports of now are diagnosed."""
    now = state.latest_us
    rules = catalog.sequences
    longest = max((r.surfaces_within_s for r in rules.values()), default=0) * 1_000_000
    for name, uses in state.keys.items():
        window = rules[name].window_s * 1_000_000 if name in rules else 0
        for key in [k for k, use in uses.items() if use.at_us < now - window]:
            del uses[key]
    for name, sessions in state.precursors.items():
        window = rules[name].window_s * 1_000_000 if name in rules else 0
        for session in [s for s, p in sessions.items() if p.at_us < now - window]:
            del sessions[session]
    for name, calls in state.polls.items():
        rule = rules.get(name)
        horizon = now - int(rule.count * rule.min_interval_s * 2_000_000) if rule else now + 1
        calls[:] = [c for c in calls if c[0] >= horizon]  # as _too_frequent keeps them
    state.detections = [d for d in state.detections
                        if d.at_us >= now - longest or d.detected_at_us >= wall_us - longest]
    state.reports = [r for r in state.reports
                     if r.received_at_us >= now - longest or r.diagnosed_at_us >= wall_us - longest]
    live = {d.detection_id for d in state.detections}
    kept = {r.report_id for r in state.reports}
    state.traced = {r: d for r, d in state.traced.items() if d in live and r in kept}


def is_idle(state: UserState) -> bool:
    """Nothing left worth storing: the table may forget this user."""
    return not (state.withdrawn or state.pending or state.detections or state.reports
                or any(state.keys.values()) or any(state.precursors.values()) or any(state.polls.values()))
