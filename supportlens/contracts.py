"""Event contracts (DESIGN.md §3): typed records, strict validation, JSON encoding.

Every record on a topic is one of these structs encoded as JSON. Decoding is strict:
wrong types, missing required fields, out-of-range values and bad IP addresses are
rejected with an :class:`InvalidRecord` whose message names the field. Fields this
version does not know are not dropped: they move into ``attributes`` so a newer
producer never loses data on an older consumer.

Times are UTC microseconds since the epoch (``*_us``), durations microseconds.

The records a worker holds by the hundred thousand (spans, reports, requests) are
``gc=False``: plain trees of values that never form a reference cycle, so the garbage
collector need not scan them (it spent more time on them than decoding did).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

SCHEMA_VERSION = 1

# Limits keep one hostile record from costing memory downstream; they are generous
# for real traffic (an OTel attribute value rarely exceeds a few hundred bytes).
# Patterns end in \Z, not $: $ also matches before a final line break ("id\n").
Id = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+\Z")]
OptionalId = Annotated[str, Meta(max_length=128)]
Name = Annotated[str, Meta(max_length=256)]
Text = Annotated[str, Meta(max_length=4096)]
TimestampUs = Annotated[int, Meta(ge=0, le=32_503_680_000_000_000)]  # up to year 3000
DurationUs = Annotated[int, Meta(ge=0, le=86_400_000_000)]  # a day
HttpStatus = Annotated[int, Meta(ge=100, le=599)]
AttributeValue = str | int | float | bool
Attributes = Annotated[dict[str, AttributeValue], Meta(max_length=128)]
Locale = Literal["en", "zh-CN"]

Side = Literal["client", "server"]
SpanStatus = Literal["ok", "error"]
Tier = Literal["vip", "standard"]
Channel = Literal["webhook", "email", "none"]


# Records replayed by a drill carry this attribute: every stage keeps drills apart from real traffic.
DRILL_ATTRIBUTE = "supportlens.drill"


def is_drill(attributes: dict[str, "AttributeValue"]) -> bool:
    return attributes.get(DRILL_ATTRIBUTE) in (True, "true")


class InvalidRecord(ValueError):
    """A record that cannot be accepted; ``reason`` names the field and the problem."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"invalid {kind}: {reason}")
        self.kind = kind
        self.reason = reason


def _check_ip(field: str, value: str) -> None:
    if value and not _is_ip(value):
        raise ValueError(f"`{field}` is not an IP address: {value[:64]!r}")


@lru_cache(maxsize=65_536)
def _is_ip(value: str) -> bool:
    # Cached: a client sends many spans from one address, and parsing it was a tenth of the sink's time.
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class Network(msgspec.Struct, gc=False, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Where the client sits on the internet."""

    isp: Name = ""
    asn: Annotated[int, Meta(ge=0, le=4_294_967_295)] = 0
    connection_type: Name = ""  # wifi, cellular-4g, cellular-5g, ethernet, …


class Span(msgspec.Struct, gc=False, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A normalized span from a client app (``side=client``) or a backend service (``side=server``)."""

    request_id: Id
    trace_id: OptionalId = ""
    span_id: OptionalId = ""
    parent_span_id: OptionalId = ""
    side: Side
    service: Annotated[str, Meta(min_length=1, max_length=256)]
    operation: Name = ""
    start_us: TimestampUs
    duration_us: DurationUs
    status: SpanStatus
    http_status: HttpStatus | None = None
    error_code: Name = ""
    error_message: Text = ""
    client_ip: Annotated[str, Meta(max_length=64)] = ""
    user_id: OptionalId = ""
    account_id: OptionalId = ""
    app_version: Name = ""
    platform: Name = ""
    region: Name = ""
    network: Network | None = None
    attributes: Attributes = {}
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # inlined _check_ip: this runs for every span decoded, and server spans have no address
        if self.client_ip and not _is_ip(self.client_ip):
            raise ValueError(f"`client_ip` is not an IP address: {self.client_ip[:64]!r}")


class FaultReport(msgspec.Struct, gc=False, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A one-click fault report: what the user saw, with their recent client trace log."""

    report_id: Id
    received_at_us: TimestampUs
    user_id: OptionalId = ""
    account_id: OptionalId = ""
    client_ip: Annotated[str, Meta(min_length=1, max_length=64)]
    locale: Locale = "en"
    app_version: Name = ""
    platform: Name = ""
    region: Name = ""
    network: Network | None = None
    request_ids: Annotated[list[Id], Meta(max_length=50)] = []  # the first is the one reported
    error_code: Name = ""
    user_message: Text = ""
    client_log: Annotated[list[Span], Meta(max_length=200)] = []
    attributes: Attributes = {}
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_ip("client_ip", self.client_ip)


class BehaviourEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A consent-gated user behaviour event (screen view, tap, …)."""

    event_id: Id
    user_id: Id
    account_id: OptionalId = ""
    ts_us: TimestampUs
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    screen: Name = ""
    app_version: Name = ""
    platform: Name = ""
    region: Name = ""
    attributes: Attributes = {}
    schema_version: int = SCHEMA_VERSION


class Contact(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    name: Name = ""
    email: Annotated[str, Meta(max_length=320, pattern=r"^[^@\s]+@[^@\s]+\Z")]


class Account(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A customer account: its tier decides who is notified proactively."""

    account_id: Id
    name: Name = ""
    tier: Tier = "standard"
    locale: Locale = "en"
    channel: Channel = "none"
    webhook_url: Annotated[str, Meta(max_length=2048, pattern=r"^(https?://\S+)?\Z")] = ""
    contacts: Annotated[list[Contact], Meta(max_length=20)] = []
    # who reviews the account with the customer; `supportlens report account --email` goes to them
    service_manager: Annotated[str, Meta(max_length=320, pattern=r"^([^@\s]+@[^@\s]+)?\Z")] = ""
    attributes: Attributes = {}
    schema_version: int = SCHEMA_VERSION


DiagnosisClass = Literal[
    "network_unreachable", "network_slow", "server_error", "server_slow",
    "client_misuse", "client_crash", "ok", "unknown",
]

CLASSES: tuple[str, ...] = DiagnosisClass.__args__  # type: ignore[attr-defined]


class Diagnosis(msgspec.Struct, gc=False, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One diagnosis class (DESIGN.md §4) and what it rests on."""

    cls: DiagnosisClass
    service: Name = ""  # the failing or slow service, for server-side classes
    team: Name = ""  # its owner team
    code: Name = ""  # the catalogued error code, when one matched
    evidence: Text = ""  # for support staff: which span, which status, which timings
    catalog_version: int = 0
    # a failure the catalog traces to an earlier misuse (a sequence rule, streams/sequences.py):
    # the class it looked like on its own, and the detection that explains it
    surfaced_as: Annotated[str, Meta(max_length=64)] = ""
    misuse_detection_id: OptionalId = ""


class Hop(msgspec.Struct, gc=False, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One server span of a request's call chain, timed relative to the request's start."""

    service: Name
    team: Name = ""
    operation: Name = ""
    span_id: OptionalId = ""
    parent_span_id: OptionalId = ""
    offset_us: int = 0
    duration_us: DurationUs = 0
    status: SpanStatus = "ok"
    http_status: HttpStatus | None = None
    error_code: Name = ""


class CorrelatedRequest(msgspec.Struct, gc=False, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One request seen from both sides (or the side that was seen), with its diagnosis.

    ``version`` is the number of spans it was built from. Spans only accumulate, so a
    higher version knows more, and the same version always means the same content —
    also when a restarted worker emits a request again. Consumers keep the highest
    version per ``request_id``.
    """

    request_id: Id
    version: int = 1
    trace_id: OptionalId = ""
    start_us: TimestampUs
    operation: Name = ""
    user_id: OptionalId = ""
    account_id: OptionalId = ""
    client_ip: Annotated[str, Meta(max_length=64)] = ""
    app_version: Name = ""
    platform: Name = ""
    region: Name = ""
    network: Network | None = None
    has_client: bool = False
    has_server: bool = False
    client_duration_us: DurationUs = 0
    client_status: SpanStatus = "ok"
    client_http_status: HttpStatus | None = None
    client_error_code: Name = ""
    server_duration_us: DurationUs = 0
    server_status: SpanStatus = "ok"
    server_http_status: HttpStatus | None = None
    root_service: Name = ""
    teams: list[Name] = []
    hops: list[Hop] = []
    span_count: int = 0
    diagnosis: Diagnosis
    completeness: Literal["complete", "client_only", "server_only"] = "complete"
    drill: bool = False


class DiagnosedReport(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A fault report with its diagnosis and the explanation shown to the user, in their locale."""

    report_id: Id
    received_at_us: TimestampUs
    diagnosed_at_us: TimestampUs
    user_id: OptionalId = ""
    account_id: OptionalId = ""
    client_ip: Annotated[str, Meta(max_length=64)] = ""
    locale: Locale = "en"
    app_version: Name = ""
    platform: Name = ""
    region: Name = ""
    network: Network | None = None
    request_ids: list[Id] = []
    primary_request_id: OptionalId = ""
    diagnosis: Diagnosis
    title: Text = ""  # one line for the user
    explanation: Text = ""  # what happened, in the user's words; no host names, no stack traces
    action: Text = ""  # what the user can do meanwhile
    doc_url: Annotated[str, Meta(max_length=2048)] = ""
    drill: bool = False


Score = Annotated[float, Meta(ge=0.0, le=1.0)]
Count = Annotated[int, Meta(ge=0)]
Rate = Annotated[float, Meta(ge=0.0)]
Dimensions = Annotated[dict[str, Name], Meta(max_length=16)]


class SurgeEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A surge of fault reports or failed requests in one dimension value: its start,
    its updates while it lasts, and its end (DESIGN.md §5)."""

    surge_id: Id
    phase: Literal["start", "update", "end"]
    kind: Literal["surge", "canary"] = "surge"  # canary: a rolling-out version fails more than the one it replaces
    at_us: TimestampUs
    started_at_us: TimestampUs
    dimension: Name  # service | diagnosis_class | region | network | app_version | platform
    value: Name
    score: Score
    rate_per_min: Rate = 0.0
    baseline_per_min: Rate = 0.0
    reports: Count = 0
    failed_requests: Count = 0
    affected_users: Count = 0
    drill: bool = False
    attributes: Attributes = {}
    schema_version: int = SCHEMA_VERSION


ChangeKind = Literal["deploy", "config", "feature_flag", "infra"]


class Change(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A deploy, configuration change, feature flag or infrastructure change, as a CI/CD
    pipeline or a person posts it (gateway ``POST /v1/changes``, or the ``changes`` topic).
    Posting it again with the same ``change_id`` (say, with ``finished_at_us`` once a rollout
    is done) replaces it. ``service`` is what changed: a backend service, or a client app
    (``mobile-app``) whose ``version`` is what spans carry as ``app_version``."""

    change_id: Id
    kind: ChangeKind
    service: Annotated[str, Meta(min_length=1, max_length=256)]
    version: Name = ""
    from_version: Name = ""
    region: Name = ""  # empty: every region
    platform: Name = ""  # for a client app: ios, android, …; empty: all
    started_at_us: TimestampUs
    finished_at_us: TimestampUs | None = None
    author: Name = ""
    link: Annotated[str, Meta(max_length=2048, pattern=r"^(https?://\S+)?\Z")] = ""
    description: Text = ""
    drill: bool = False
    attributes: Attributes = {}
    schema_version: int = SCHEMA_VERSION


class Suspect(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A change that could explain an incident, as the incident manager ranked it (internal:
    customer notices never show it)."""

    change_id: Id
    kind: ChangeKind
    service: Name
    version: Name = ""
    started_at_us: TimestampUs
    score: Annotated[float, Meta(ge=0, le=1)]
    reason: Text  # e.g. "payment 1.4.2 deployed 3 min before the surge, in the failing hop"


IncidentTransition = Literal["declared", "updated", "escalated", "mitigated", "resolved"]
Severity = Literal["sev1", "sev2", "sev3", "sev4"]


class IncidentEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One transition of an incident, with the reason a person can read. ``sequence``
    counts an incident's transitions: the highest is its current state."""

    incident_id: Id
    sequence: Annotated[int, Meta(ge=1)]
    transition: IncidentTransition
    at_us: TimestampUs
    started_at_us: TimestampUs
    resolved_at_us: TimestampUs | None = None
    severity: Severity
    title: Text = ""
    reason: Text
    root_key: Name  # related surges merge under one root, e.g. "service=payment"
    dimensions: Dimensions = {}  # what is affected, e.g. {"service": "payment", "region": "cn-east"}
    services: Annotated[list[Name], Meta(max_length=64)] = []
    teams: Annotated[list[Name], Meta(max_length=64)] = []
    affected_users: Count = 0
    declared_by: Name = "policy"  # or a person's name
    suspects: Annotated[list[Suspect], Meta(max_length=10)] = []  # likeliest first
    drill: bool = False
    attributes: Attributes = {}
    schema_version: int = SCHEMA_VERSION


NotificationKind = Literal["incident_declared", "incident_resolved", "misuse_advice"]


class Notification(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A message to a customer account in the outbox; ``notification_id`` is the idempotency
    key (one per incident, account and kind; per pattern and week for advice)."""

    notification_id: Id
    account_id: Id
    kind: NotificationKind
    created_at_us: TimestampUs
    incident_id: OptionalId = ""
    channel: Channel = "none"
    to: Annotated[str, Meta(max_length=2048)] = ""  # the webhook URL or e-mail address, from the account
    locale: Locale = "en"
    subject: Text = ""
    body: Text = ""
    drill: bool = False
    attributes: Attributes = {}
    schema_version: int = SCHEMA_VERSION


# no_channel: the notification named no channel or no address, so nothing was sent (final).
DeliveryOutcome = Literal["delivered", "failed", "rate_limited", "dead_lettered", "skipped_drill", "no_channel"]


class DeliveryAttempt(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """One attempt to deliver a notification, and how it went."""

    notification_id: Id
    attempt: Annotated[int, Meta(ge=1)]
    account_id: Id
    at_us: TimestampUs
    channel: Channel
    outcome: DeliveryOutcome
    detail: Text = ""  # e.g. the HTTP status or SMTP reply; never a secret
    drill: bool = False
    schema_version: int = SCHEMA_VERSION


DIMENSIONS: tuple[str, ...] = ("service", "diagnosis_class", "region", "network", "app_version", "platform")
Dimension = Literal["service", "diagnosis_class", "region", "network", "app_version", "platform"]
UserHashes = Annotated[list[int], Meta(max_length=1024)]


class SignalCount(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True,
                  tag="count", tag_field="kind"):
    """A worker's partial count of failures in one dimension value and one time bucket, on
    ``incident-signals``. The surge detector sums the partials of every worker. ``users`` and
    ``active_users`` are the smallest user hashes seen (a K-minimum-values sketch), so merging
    partials estimates distinct users with bounded memory."""

    source: Id  # the worker instance that counted
    dimension: Dimension
    value: Name
    bucket_start_us: TimestampUs
    failed: Count = 0  # requests whose first failure evidence fell into this bucket
    reports: Count = 0  # fault reports received in this bucket
    requests: Count = 0  # all requests seen (client or entry server span), for the share of users
    users: UserHashes = []  # affected users (failed or reporting)
    active_users: UserHashes = []
    accounts: Annotated[list[Id], Meta(max_length=1024)] = []  # accounts of the failed requests
    drill: bool = False


class MisuseCount(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True,
                  tag="misuse", tag_field="kind"):
    """A worker's count of one account's requests refused for a catalogued misuse (``code``),
    since its last flush, for best-practice advice."""

    source: Id
    account_id: Id
    code: Annotated[str, Meta(min_length=1, max_length=256)]
    at_us: TimestampUs  # the latest such request
    count: Annotated[int, Meta(ge=1)]
    drill: bool = False


class SignalClock(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True,
                  tag="clock", tag_field="kind"):
    """How far (event time) a worker has counted: no later partial of ``source`` is for a bucket
    that ended before ``watermark_us`` (a later one still counts, in the oldest open bucket)."""

    source: Id
    watermark_us: TimestampUs
    sent_at_us: TimestampUs = 0  # wall time, for telling idle sources apart
    drill: bool = False  # drills keep a time of their own: a replay must not move real time


class IncidentCommand(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True,
                      tag="command", tag_field="kind"):
    """A person's decision (``supportlens declare`` / ``resolve``), applied by the incident manager."""

    action: Literal["declare", "resolve"]
    at_us: TimestampUs
    by: Annotated[str, Meta(min_length=1, max_length=128)]
    reason: Text = ""
    incident_id: OptionalId = ""  # resolve: which one
    title: Text = ""  # declare
    dimensions: Dimensions = {}  # declare: what is affected
    severity: Severity | None = None  # declare: default from the policy


class VersionCount(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True,
                   tag="version", tag_field="kind"):
    """A worker's partial count of one version of one target in one bucket, for the canary
    comparison: a service (``dimension`` service; its server spans' ``service.version``) or
    an app on a platform (``dimension`` app_version; target ``mobile-app/android``)."""

    source: Id
    target: Name
    dimension: Literal["service", "app_version"]
    version: Name
    bucket_start_us: TimestampUs
    requests: Count = 0  # spans of that target and version
    failed: Annotated[dict[Name, Count], Meta(max_length=16)] = {}  # by (provisional) diagnosis class
    drill: bool = False


class ChangeSignal(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True,
                   tag="change", tag_field="kind"):
    """A change from the ``changes`` topic, forwarded by a worker so the incident manager
    sees it in order with the counts (its suspects for incidents)."""

    change: Change


class SequenceStep(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True,
                   tag="step", tag_field="kind"):
    """A request or behaviour event one of the catalog's sequence rules watches (``user-steps``,
    keyed by its user: ``streams.sequences``)."""

    user_id: OptionalId = ""
    account_id: OptionalId = ""
    ts_us: TimestampUs
    name: Name  # the operation, or the behaviour event's name
    request_id: OptionalId = ""
    session_id: OptionalId = ""
    attributes: Attributes = {}  # only those a rule reads (an idempotency key, a body hash)
    behaviour: bool = False  # from a consented behaviour event: forgotten when consent is withdrawn
    drill: bool = False


class ReportStep(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True,
                 tag="report", tag_field="kind"):
    """A diagnosed report forwarded to its user's sequence state, which may trace it to an
    earlier misuse (before or after that misuse was detected)."""

    report: DiagnosedReport


UserStep = SequenceStep | ReportStep
_user_step_decoder = msgspec.json.Decoder(UserStep)


def decode_user_step(data: bytes, max_bytes: int = 1_048_576) -> UserStep:
    """Decode one record of ``user-steps``; raises :class:`InvalidRecord` naming the field."""
    return _decode_tagged(_user_step_decoder, "user step", data, max_bytes)


class MisuseDetection(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A catalogued misuse found in a user's sequence of requests and behaviour
    (``misuse-detections``): it counts as that misuse even where its failure comes later."""

    detection_id: Id  # the rule and the misusing request: a repeat is the same detection
    rule: Name
    code: Name  # the catalog code it counts as (its wording, its doc)
    user_id: OptionalId = ""
    account_id: OptionalId = ""
    at_us: TimestampUs  # when the misusing request started (its span read first: the client's or its entry hop's)
    request_id: OptionalId = ""
    earlier_request_id: OptionalId = ""  # the request it conflicts with, where there is one
    session_id: OptionalId = ""
    evidence: Text = ""
    detected_at_us: TimestampUs = 0
    drill: bool = False
    schema_version: int = SCHEMA_VERSION


Signal = SignalCount | MisuseCount | SignalClock | IncidentCommand | ChangeSignal | VersionCount
_signal_decoder = msgspec.json.Decoder(Signal)


def decode_signal(data: bytes, max_bytes: int = 1_048_576) -> Signal:
    """Decode one record of ``incident-signals``; raises :class:`InvalidRecord` naming the field."""
    return _decode_tagged(_signal_decoder, "signal", data, max_bytes)


def _decode_tagged(decoder: msgspec.json.Decoder[Any], kind: str, data: bytes, max_bytes: int) -> Any:
    """One record of a topic of tagged records (``kind`` names the record type in errors)."""
    if len(data) > max_bytes:
        raise InvalidRecord(kind, f"record is {len(data):,} bytes, over the {max_bytes:,}-byte limit")
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise InvalidRecord(kind, explain(str(exc))) from None
    except UNREADABLE as exc:
        raise InvalidRecord(kind, why_unreadable(exc)) from None


Record = (Span | FaultReport | BehaviourEvent | Account | CorrelatedRequest | DiagnosedReport | SurgeEvent
          | IncidentEvent | Notification | DeliveryAttempt | Change | MisuseDetection)
R = TypeVar("R", Span, FaultReport, BehaviourEvent, Account, CorrelatedRequest, DiagnosedReport, SurgeEvent,
            IncidentEvent, Notification, DeliveryAttempt, Change, MisuseDetection)

KIND_NAMES: dict[type, str] = {
    Span: "span",
    FaultReport: "fault report",
    BehaviourEvent: "behaviour event",
    Account: "account",
    CorrelatedRequest: "correlated request",
    DiagnosedReport: "diagnosed report",
    SurgeEvent: "surge event",
    IncidentEvent: "incident event",
    Notification: "notification",
    DeliveryAttempt: "delivery attempt",
    Change: "change",
    MisuseDetection: "misuse detection",
}

_encoder = msgspec.json.Encoder()
_strict_decoders: dict[type, msgspec.json.Decoder[Any]] = {
    cls: msgspec.json.Decoder(cls) for cls in KIND_NAMES
}
_raw_decoder = msgspec.json.Decoder(dict[str, Any])


def encode(record: Record | Signal | UserStep) -> bytes:
    """JSON bytes of a record (defaults omitted, so the wire stays small)."""
    return _encoder.encode(record)


def decode(data: bytes, record_type: type[R], max_bytes: int = 1_048_576) -> R:
    """Decode and validate one JSON record of ``record_type``.

    Raises :class:`InvalidRecord` with a reason that names the offending field.
    """
    kind = KIND_NAMES[record_type]
    if len(data) > max_bytes:
        raise InvalidRecord(kind, f"record is {len(data):,} bytes, over the {max_bytes:,}-byte limit")
    try:
        return _strict_decoders[record_type].decode(data)
    except msgspec.DecodeError as exc:
        message = str(exc)
        if not message.startswith("Object contains unknown field"):
            raise InvalidRecord(kind, explain(message)) from None
    except UNREADABLE as exc:
        raise InvalidRecord(kind, why_unreadable(exc)) from None
    # Slow path, only for records that carry fields this version does not know.
    try:
        raw = _raw_decoder.decode(data)
        return _convert_keeping_unknown(raw, record_type, kind)
    except msgspec.DecodeError as exc:  # pragma: no cover - the strict pass already parsed it
        raise InvalidRecord(kind, explain(str(exc))) from None
    except UNREADABLE as exc:  # an unknown field's value nested deeper than the stack goes
        raise InvalidRecord(kind, why_unreadable(exc)) from None


def _convert_keeping_unknown(raw: dict[str, Any], record_type: type[R], kind: str) -> R:
    known = set(record_type.__struct_fields__)
    extras = {key: raw.pop(key) for key in list(raw) if key not in known}
    if extras and "attributes" not in known:
        raise InvalidRecord(kind, f"field `{next(iter(extras))[:128]}` is not part of a {kind}")
    attributes = raw.get("attributes", {})
    # Not an object: left for the contract to reject. Replacing it would accept the record
    # or not depending on whether an unknown field came before it.
    if isinstance(attributes, dict):
        merged = dict(attributes)
        for key, value in extras.items():
            merged.setdefault(key, value if isinstance(value, (str, int, float, bool))
                              else _encoder.encode(value).decode())
        raw["attributes"] = merged
    try:
        return msgspec.convert(raw, record_type)
    except msgspec.ValidationError as exc:
        raise InvalidRecord(kind, explain(str(exc))) from None


# Besides DecodeError, msgspec raises these on hostile JSON: bytes that are not UTF-8 in an
# object key, and arrays or objects nested deeper than the interpreter's stack.
UNREADABLE = (UnicodeDecodeError, RecursionError)


def why_unreadable(exc: BaseException) -> str:
    """The reason for one of :data:`UNREADABLE`, in a person's words."""
    if isinstance(exc, RecursionError):
        return "nested too deeply (arrays and objects inside each other)"
    return "not valid JSON (it holds bytes that are not UTF-8 text)"


def explain(message: str) -> str:
    """msgspec's message in a person's words: ``$.request_id`` becomes ``field `request_id```."""
    if message.startswith("JSON is malformed"):
        return f"not valid JSON ({message.removeprefix('JSON is malformed: ')})"
    if message.startswith("Input data was truncated"):
        return "not valid JSON (the data ends too early)"
    text, sep, path = message.rpartition(" - at `")
    if sep:
        field = path.rstrip("`").removeprefix("$").lstrip(".") or "record"
        return f"field `{field}`: {text[0].lower()}{text[1:]}"
    return message[0].lower() + message[1:] if message else "invalid record"
