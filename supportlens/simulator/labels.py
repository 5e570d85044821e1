"""Ground truth of a simulator run, written beside (never into) the events the pipeline reads.

A labels file is JSON lines: one ``request`` line per simulated request, one ``report``
line per fault report, and a final ``run`` line with the counts per topic and the
windows in which incidents are expected.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import msgspec


class RequestLabel(msgspec.Struct, kw_only=True, tag="request", tag_field="kind"):
    request_id: str
    scenario: str
    expected_class: str
    start_us: int
    user_id: str
    account_id: str
    client_ip: str
    operation: str
    failing_service: str = ""
    server_spans: int
    client_span_emitted: bool  # False when the user did not consent to client tracing
    in_scenario_window: bool


class ReportLabel(msgspec.Struct, kw_only=True, tag="report", tag_field="kind"):
    report_id: str
    scenario: str
    expected_class: str
    received_at_us: int
    user_id: str
    account_id: str
    request_ids: list[str]
    in_scenario_window: bool


class IncidentWindow(msgspec.Struct, kw_only=True, omit_defaults=True):
    scenario: str
    expected_class: str
    dimension: dict[str, str]
    start_us: int
    end_us: int
    expected_suspect: str = ""  # the change id the incident should name as its top suspect; "": none


class RolloutStep(msgspec.Struct, kw_only=True):
    at_us: int  # from this time on ...
    share: float  # ... the new version serves this share of the service's requests


class RolloutLabel(msgspec.Struct, kw_only=True):
    """A scripted gradual deploy: which version replaced which, and when it reached each share."""

    change_id: str
    service: str
    from_version: str
    to_version: str
    steps: list[RolloutStep]
    failure_probability: float  # a request the new version serves fails with it (the old one: noise only)
    expected_class: str


class ChangeLabel(msgspec.Struct, kw_only=True):
    """A change the run put on the ``changes`` topic, and whether it caused the run's failures."""

    change_id: str
    kind: str
    service: str
    version: str = ""
    started_at_us: int
    finished_at_us: int | None = None
    cause: bool  # True: the expected top suspect; False: a distractor that explains nothing
    records: int  # records sent for it (a rollout is posted when it starts and again when it finishes)


class FunnelStepLabel(msgspec.Struct, kw_only=True):
    step: str  # the behaviour event's name (the action)
    screen: str
    drop_share: float  # of the users at the step before, the share who never reach this one (0: the first step)


class FunnelPathLabel(msgspec.Struct, kw_only=True):
    """A funnel simulated users walk, and where most of them drop (everyone but the stuck users)."""

    funnel: str
    steps: list[FunnelStepLabel]
    sessions: int  # sessions started on it in the run
    drop_step: str  # the step most users who enter never reach (the largest expected loss)


class StuckStepLabel(msgspec.Struct, kw_only=True):
    """The one stuck step: users of ``app_version`` on ``platform`` mostly never reach ``step``."""

    funnel: str
    step: str
    app_version: str
    platform: str
    drop_share: float  # of those users at the step before, the share who never reach it
    drop_step: str  # where most of those users drop: ``step``


class WithdrawalLabel(msgspec.Struct, kw_only=True):
    user_id: str
    at_us: int  # the time of their ``consent_withdrawn`` event: no behaviour of theirs after it


class BehaviourLabel(msgspec.Struct, kw_only=True):
    """Ground truth of the behaviour paths (issue #18): funnels, the stuck step, who withdrew consent."""

    sessions: int
    funnels: list[FunnelPathLabel]
    stuck: StuckStepLabel
    withdrawn: list[WithdrawalLabel]


class SequenceEpisodeLabel(msgspec.Struct, kw_only=True):
    """One episode of the sequence misuse: an order reusing an earlier order's idempotency key with
    another body (answered with the earlier order), the payment that then fails, and its report."""

    earlier_request_id: str  # the first order with the key
    misuse_request_id: str  # the order that reused it with another body: the misuse
    misuse_at_us: int
    failure_request_id: str  # the payment that failed because of it (looks like a server error alone)
    report_id: str  # the user's report of that failure, naming it first
    report_received_at_us: int


class SequenceMisuseLabel(msgspec.Struct, kw_only=True):
    """Misuse that fails elsewhere (issue #18): one standard account's integration user reuses
    idempotency keys; each report of the payment failure it causes is truly ``client_misuse``."""

    account_id: str
    user_id: str
    rule: str = "idempotency-key-reuse"  # the catalog's [sequences.<rule>]
    code: str = "IDEMPOTENCY_KEY_REUSED"
    surfaced_as: str = "server_error"  # what the failure looks like on its own ...
    surfaced_in: str = "payment"  # ... and where
    episodes: list[SequenceEpisodeLabel]


class RunLabel(msgspec.Struct, kw_only=True, omit_defaults=True, tag="run", tag_field="kind"):
    scenario: str
    seed: int
    rate: float
    duration_s: int
    start_us: int
    end_us: int
    users: int
    requests: int
    visible_requests: int  # requests with at least one span on a span topic
    counts: dict[str, int]  # records per logical topic
    classes: dict[str, int]  # requests per expected class
    report_classes: dict[str, int]
    expected_incidents: list[IncidentWindow]
    scenario_window: tuple[int, int]
    vip_accounts: list[str]
    misuse_account: str
    # only scenarios with changes (bad-deploy) write these; omitted otherwise
    rollout: RolloutLabel | None = None
    changes: list[ChangeLabel] = []
    behaviour: BehaviourLabel | None = None  # behaviour paths of consented users (every scenario)
    sequence_misuse: SequenceMisuseLabel | None = None  # one account's misuse that fails elsewhere (every scenario)


Label = RequestLabel | ReportLabel | RunLabel
_decoder = msgspec.json.Decoder(Label)
_encoder = msgspec.json.Encoder()


def encode_label(label: Label) -> bytes:
    return _encoder.encode(label) + b"\n"


def read_labels(path: Path) -> Iterator[Label]:
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                yield _decoder.decode(line)


def read_run(path: Path) -> RunLabel:
    """The ``run`` summary of a labels file (its last line)."""
    with path.open("rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        back = 65536
        while True:  # the run line lists who withdrew consent: it may be longer than one read back
            handle.seek(max(0, size - back))
            tail = handle.read().rstrip(b"\n")
            if b"\n" in tail or back >= size:
                break
            back *= 4
        last = tail.rsplit(b"\n", 1)[-1]
    label = _decoder.decode(last)
    if not isinstance(label, RunLabel):
        raise ValueError(f"{path} is incomplete: its last line is not the run summary")
    return label
