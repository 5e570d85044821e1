"""The catalog's sequence rules (streams/sequences.py): misuse found in one user's steps, and the
later report whose symptom looked like something else traced to it."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from supportlens.contracts import Diagnosis, DiagnosedReport, SequenceStep
from supportlens.errors import UserError
from streams import sequences
from streams.catalog import load_catalog
from streams.sequences import UserState, on_due, on_report, on_step

CATALOG = load_catalog()
T0 = 1_780_000_000_000_000
S = 1_000_000
NOW = 1_780_000_100.0  # wall seconds


def order(request_id: str, at_s: float, key: str = "k-1", body: str = "h-1", **kw) -> SequenceStep:
    return SequenceStep(user_id="user-1", account_id="acct-1", ts_us=T0 + int(at_s * S), name="POST /v1/orders",
                        request_id=request_id, attributes={"idempotency_key": key, "body_sha256": body}, **kw)


def step(name: str, request_id: str, at_s: float, session: str = "", behaviour: bool = False) -> SequenceStep:
    return SequenceStep(user_id="user-1", account_id="acct-1", ts_us=T0 + int(at_s * S), name=name,
                        request_id=request_id, session_id=session, behaviour=behaviour)


def report(report_id: str, at_s: float, cls: str = "server_error", service: str = "payment",
           locale: str = "en", names: tuple[str, ...] = ()) -> DiagnosedReport:
    return DiagnosedReport(
        report_id=report_id, received_at_us=T0 + int(at_s * S), diagnosed_at_us=T0 + int(at_s * S) + 3 * S,
        user_id="user-1", account_id="acct-1", locale=locale, primary_request_id="pay-1",
        request_ids=["pay-1", *names],
        diagnosis=Diagnosis(cls=cls, service=service, team="payments", code="AMOUNT_MISMATCH",
                            evidence="payment answered 500 AMOUNT_MISMATCH after 80 ms", catalog_version=2),
        title="Our payment service failed")


def test_an_order_reusing_another_orders_key_with_another_body_is_detected_once():
    state = UserState()
    assert on_step(state, order("o-1", 0, body="h-1"), CATALOG, NOW).detections == []
    found = on_step(state, order("o-2", 12, body="h-2"), CATALOG, NOW)
    [detection] = found.detections
    assert (detection.code, detection.rule) == ("IDEMPOTENCY_KEY_REUSED", "idempotency-key-reuse")
    assert (detection.request_id, detection.earlier_request_id) == ("o-2", "o-1")
    assert detection.at_us == T0 + 12 * S and detection.account_id == "acct-1"
    assert detection.detected_at_us == int(NOW * S)
    assert "o-1" in detection.evidence and "idempotency_key" in detection.evidence
    # the same steps read again (a restarted worker) detect nothing new
    assert on_step(state, order("o-2", 12, body="h-2"), CATALOG, NOW).detections == []
    assert on_step(state, order("o-1", 0, body="h-1"), CATALOG, NOW).detections == []


def test_a_retry_of_the_identical_order_is_the_documented_use():
    state = UserState()
    on_step(state, order("o-1", 0), CATALOG, NOW)
    assert on_step(state, order("o-2", 5), CATALOG, NOW).detections == []  # same key, same body
    assert on_step(state, order("o-3", 6, key="k-2", body="h-9"), CATALOG, NOW).detections == []  # a new key


def test_orders_read_out_of_order_still_blame_the_one_sent_second():
    state = UserState()
    on_step(state, order("o-2", 12, body="h-2"), CATALOG, NOW)
    [detection] = on_step(state, order("o-1", 0, body="h-1"), CATALOG, NOW).detections
    assert (detection.request_id, detection.earlier_request_id, detection.at_us) == ("o-2", "o-1", T0 + 12 * S)


def test_a_key_reused_after_its_window_is_a_new_use():
    state = UserState()
    on_step(state, order("o-1", 0), CATALOG, NOW)
    window = CATALOG.sequences["idempotency-key-reuse"].window_s
    assert on_step(state, order("o-2", window + 1, body="h-2"), CATALOG, NOW).detections == []


@pytest.mark.parametrize("locale", ["en", "zh-CN"])
def test_a_later_failure_that_looks_like_ours_is_traced_to_the_misuse(locale):
    state = UserState()
    on_step(state, order("o-1", 0), CATALOG, NOW)
    on_step(state, order("o-2", 12, body="h-2"), CATALOG, NOW)
    found = on_report(state, report("r-1", 100, locale=locale), CATALOG, T0 + 104 * S)
    [traced] = found.reports
    d = traced.diagnosis
    assert (d.cls, d.code, d.surfaced_as, d.misuse_detection_id) == (
        "client_misuse", "IDEMPOTENCY_KEY_REUSED", "server_error", "idempotency-key-reuse:o-2")
    assert "o-1" in d.evidence and "AMOUNT_MISMATCH" in d.evidence and "surfaced as server_error" in d.evidence
    wording, doc = CATALOG.wording("client_misuse", "IDEMPOTENCY_KEY_REUSED", locale)
    assert (traced.title, traced.action, traced.doc_url) == (wording.title, wording.action, doc)
    assert traced.diagnosed_at_us > report("r-1", 100).diagnosed_at_us  # the newer version wins downstream
    assert on_report(state, traced, CATALOG, T0 + 105 * S).reports == []  # our own output is not traced twice


def test_a_report_read_before_the_misuse_was_detected_is_traced_when_it_is():
    state = UserState()
    on_step(state, order("o-1", 0), CATALOG, NOW)
    assert on_report(state, report("r-1", 100), CATALOG, T0 + 104 * S).reports == []
    found = on_step(state, order("o-2", 12, body="h-2"), CATALOG, NOW)
    assert [d.request_id for d in found.detections] == ["o-2"]
    assert [(r.report_id, r.diagnosis.code) for r in found.reports] == [("r-1", "IDEMPOTENCY_KEY_REUSED")]


@pytest.mark.parametrize("reports_first", [False, True])
def test_overlapping_misuses_each_explain_the_report_that_names_their_order(reports_first):
    """One integration, two episodes: the second's reuse comes before the first's report. Each
    report is traced to the order it names, not to the latest misuse in reach."""
    state = UserState()
    steps = [order("a-1", 0, key="k-a", body="h-1"), order("a-2", 10, key="k-a", body="h-2"),
             order("b-1", 40, key="k-b", body="h-3"), order("b-2", 50, key="k-b", body="h-4")]
    reports = [report("r-a", 100, names=("a-2", "a-1")), report("r-b", 120, names=("b-2", "b-1"))]
    traced: dict[str, str] = {}

    def take(found):
        traced.update({r.report_id: r.diagnosis.misuse_detection_id for r in found.reports})

    for item in (reports + steps if reports_first else steps + reports):
        if isinstance(item, DiagnosedReport):
            take(on_report(state, item, CATALOG, T0 + 200 * S))
        else:
            take(on_step(state, item, CATALOG, NOW))
    assert traced == {"r-a": "idempotency-key-reuse:a-2", "r-b": "idempotency-key-reuse:b-2"}


def test_a_backlog_read_fast_still_traces_a_report_behind_the_users_later_steps():
    """A replay (or a worker catching up) brings the user's steps of hours later before the
    report of now is diagnosed: by event time alone the misuse would be forgotten by then."""
    state = UserState()
    on_step(state, order("o-1", 0), CATALOG, NOW)
    on_step(state, order("o-2", 12, body="h-2"), CATALOG, NOW)
    on_step(state, order("o-7", 4 * 3600, key="k-7"), CATALOG, NOW + 1)  # four hours later, read a second later
    [traced] = on_report(state, report("r-1", 100), CATALOG, T0 + 104 * S).reports
    assert traced.diagnosis.misuse_detection_id == "idempotency-key-reuse:o-2"


def test_a_report_diagnosed_again_is_traced_again():
    state = UserState()
    on_step(state, order("o-1", 0), CATALOG, NOW)
    on_step(state, order("o-2", 12, body="h-2"), CATALOG, NOW)
    assert on_report(state, report("r-1", 100), CATALOG, T0 + 104 * S).reports
    again = msgspec.structs.replace(report("r-1", 100), diagnosed_at_us=T0 + 200 * S)
    [traced] = on_report(state, again, CATALOG, T0 + 201 * S).reports
    assert traced.diagnosis.code == "IDEMPOTENCY_KEY_REUSED" and traced.diagnosed_at_us > again.diagnosed_at_us


@pytest.mark.parametrize("other", [
    report("r-2", 100, service="search"),  # failed elsewhere than where the misuse surfaces
    report("r-3", 100, cls="network_unreachable", service=""),  # a class it does not look like
    report("r-4", 5),  # before the misuse happened
    report("r-5", 12 + 1800 + 1),  # after the rule's window
])
def test_a_failure_the_misuse_does_not_explain_keeps_its_diagnosis(other):
    state = UserState()
    on_step(state, order("o-1", 0), CATALOG, NOW)
    on_step(state, order("o-2", 12, body="h-2"), CATALOG, NOW)
    assert on_report(state, other, CATALOG, T0 + 4000 * S).reports == []


def test_an_order_without_login_in_its_session_is_detected_after_the_grace():
    state = UserState()
    on_step(state, step("POST /v1/login", "l-1", 0, session="s-1"), CATALOG, NOW)
    on_step(state, step("POST /v1/orders", "o-1", 5, session="s-1"), CATALOG, NOW)  # logged in first
    on_step(state, step("POST /v1/orders", "o-2", 9, session="s-2"), CATALOG, NOW)  # a session without login
    assert on_due(state, CATALOG, NOW + 1).detections == []  # a late login may still arrive
    [detection] = on_due(state, CATALOG, NOW + 10).detections
    assert (detection.code, detection.request_id, detection.session_id) == ("ORDER_BEFORE_LOGIN", "o-2", "s-2")
    assert (detection.user_id, detection.account_id, detection.detected_at_us) == ("user-1", "acct-1", (NOW + 10) * S)
    assert state.pending == [] and on_due(state, CATALOG, NOW + 20).detections == []


def test_a_login_read_late_but_sent_first_clears_the_order():
    state = UserState()
    on_step(state, step("POST /v1/orders", "o-1", 5, session="s-1"), CATALOG, NOW)
    on_step(state, step("POST /v1/login", "l-1", 0, session="s-1"), CATALOG, NOW + 1)
    assert on_due(state, CATALOG, NOW + 10).detections == []


def test_an_order_without_a_session_is_not_judged():
    state = UserState()
    on_step(state, step("POST /v1/orders", "o-1", 5), CATALOG, NOW)
    assert state.pending == [] and on_due(state, CATALOG, NOW + 10).detections == []


def test_polling_faster_than_the_documented_interval_is_one_detection_per_run():
    state = UserState()
    found = [d for i in range(30)
             for d in on_step(state, step("GET /v1/orders/{id}", f"p-{i}", i * 0.5), CATALOG, NOW).detections]
    [detection] = found
    assert (detection.code, detection.earlier_request_id, detection.request_id) == ("POLLING_TOO_FAST", "p-0", "p-19")
    calm = UserState()
    assert not [d for i in range(30)
                for d in on_step(calm, step("GET /v1/orders/{id}", f"p-{i}", i * 1.5), CATALOG, NOW).detections]


def test_a_user_who_stopped_polling_is_forgotten():
    state = UserState()
    for i in range(5):
        on_step(state, step("GET /v1/orders/{id}", f"p-{i}", i * 0.5), CATALOG, NOW)
    assert state.polls["polling-too-fast"]
    on_step(state, order("o-1", 3600), CATALOG, NOW + 3600)  # an hour later, no more polls
    assert state.polls["polling-too-fast"] == []


def test_after_consent_is_withdrawn_no_behaviour_is_used():
    rules = msgspec.structs.replace(CATALOG, sequences={"order-without-login": msgspec.structs.replace(
        CATALOG.sequences["order-without-login"], precursor="login")})  # a behaviour event as precursor
    state = UserState()
    on_step(state, step("login", "", 0, session="s-1", behaviour=True), rules, NOW)
    assert state.precursors["order-without-login"]
    on_step(state, step(sequences.WITHDRAWN, "", 1, behaviour=True), rules, NOW)
    assert state.withdrawn and not state.precursors["order-without-login"]
    on_step(state, step("login", "", 2, session="s-2", behaviour=True), rules, NOW)
    assert not state.precursors["order-without-login"]
    # judged without the behaviour it would need: not judged at all, never a false accusation
    on_step(state, step("POST /v1/orders", "o-1", 5, session="s-1"), rules, NOW)
    assert state.pending == [] and on_due(state, rules, NOW + 10).detections == []


def test_a_drill_detection_explains_only_drill_reports():
    state = UserState()
    on_step(state, order("o-1", 0, drill=True), CATALOG, NOW)
    on_step(state, order("o-2", 12, body="h-2", drill=True), CATALOG, NOW)
    assert on_report(state, report("r-1", 100), CATALOG, T0 + 104 * S).reports == []


def test_state_packs_and_forgets_what_no_rule_can_use():
    state = UserState()
    on_step(state, order("o-1", 0), CATALOG, NOW)
    on_step(state, order("o-2", 12, body="h-2"), CATALOG, NOW)
    on_report(state, report("r-9", 30, service="search"), CATALOG, T0 + 31 * S)
    assert sequences.unpack(sequences.pack(state)) == state
    assert not sequences.is_idle(state)
    on_step(state, order("o-9", 200_000, key="k-9"), CATALOG, NOW + 200_000)  # two days later
    assert list(state.keys["idempotency-key-reuse"]) == ["k-9"]
    assert state.detections == [] and state.reports == []


def test_a_sequence_rule_the_catalog_cannot_honour_stops_the_load(tmp_path: Path):
    text = (Path(sequences.__file__).with_name("problem_catalog.toml")).read_text(encoding="utf-8")
    bad = tmp_path / "catalog.toml"
    bad.write_text(text.replace('code = "POLLING_TOO_FAST"', 'code = "NO_SUCH_CODE"'), encoding="utf-8")
    with pytest.raises(UserError, match="polling-too-fast.*NO_SUCH_CODE"):
        load_catalog(bad)
    bad.write_text(text.replace('precursor = "POST /v1/login"\n', ""), encoding="utf-8")
    with pytest.raises(UserError, match="order-without-login.*needs precursor"):
        load_catalog(bad)
