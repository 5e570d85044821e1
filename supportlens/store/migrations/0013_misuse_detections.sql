-- Misuse found in a user's sequence of requests and behaviour (issue #18; streams/sequences.py):
-- an order sent with an earlier order's idempotency key, an order without a login, polling
-- too fast. Such misuse is refused nowhere; its failure comes later, elsewhere, and looks like
-- something else. Support needs both ends: what the customer did, and which report it explains.

-- One row per detection: its id names the rule and the misusing request, so a detection a
-- restarted worker writes again replaces itself (no version column: both copies say the same;
-- `detected_at` is when a worker found it, not part of what was found). Ordered for "what
-- misuse did this account / user make lately": an integration without users has only its
-- account, and an account's users sit together. The user and the detection id (which
-- `report_diagnoses.misuse_detection_id` names) have bloom indexes for the lookups that
-- start from them; the account leads the key and needs none. `at` (the misusing request)
-- follows from the detection id, so a repeat never lands in another month's partition.
CREATE TABLE IF NOT EXISTS misuse_detections
(
    account_id          String,
    user_id             String,
    detection_id        String,
    at                  DateTime64(6, 'UTC'),
    rule                LowCardinality(String),   -- the catalog's [sequences.<rule>]
    code                LowCardinality(String),   -- the catalog code it counts as
    request_id          String,                   -- the misusing request
    earlier_request_id  String,                   -- the request it conflicts with, where there is one
    session_id          String,
    evidence            String,
    detected_at         DateTime64(6, 'UTC'),
    drill               Bool,
    INDEX idx_user_id user_id TYPE bloom_filter GRANULARITY 1,
    INDEX idx_detection_id detection_id TYPE bloom_filter GRANULARITY 1
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (account_id, user_id, detection_id);

-- A report traced to an earlier misuse is diagnosed again: `client_misuse` with the misuse's
-- code, the class the failure looked like on its own, and the detection that explains it. It
-- is written with a later `diagnosed_at`, so it replaces the symptom's diagnosis (the table's
-- version column). Untraced diagnoses keep ''.
ALTER TABLE report_diagnoses
    ADD COLUMN IF NOT EXISTS diagnosis_surfaced_as LowCardinality(String) DEFAULT '' AFTER diagnosis_code,
    ADD COLUMN IF NOT EXISTS misuse_detection_id String DEFAULT '' AFTER diagnosis_surfaced_as;

-- The support views of 0007 name their columns: again, with the trace of a report, and with
-- detections in a customer's story (kind 'misuse'; they carry no client IP: find them by user
-- or account).
CREATE OR REPLACE VIEW fault_reports_diagnosed AS
SELECT
    r.report_id AS report_id, r.received_at AS received_at, r.client_ip AS client_ip,
    r.user_id AS user_id, r.account_id AS account_id, r.locale AS locale,
    r.app_version AS app_version, r.platform AS platform, r.region AS region,
    r.isp AS isp, r.connection_type AS connection_type, r.request_ids AS request_ids,
    r.error_code AS error_code, r.user_message AS user_message,
    d.diagnosis_class AS diagnosis_class, d.diagnosis_service AS diagnosis_service,
    d.diagnosis_team AS diagnosis_team, d.diagnosis_code AS diagnosis_code,
    d.diagnosis_surfaced_as AS diagnosis_surfaced_as, d.misuse_detection_id AS misuse_detection_id,
    d.title AS title, d.explanation AS explanation, d.action AS action, d.doc_url AS doc_url,
    d.diagnosed_at AS diagnosed_at, d.drill AS drill
FROM fault_reports AS r FINAL
LEFT JOIN (SELECT * FROM report_diagnoses FINAL) AS d ON d.report_id = r.report_id
SETTINGS join_use_nulls = 0;

-- SELECT * FROM customer_timeline WHERE user_id = 'user-002549' AND at > now() - INTERVAL 1 DAY ORDER BY at
CREATE OR REPLACE VIEW customer_timeline AS
SELECT
    start AS at, 'request' AS kind, request_id AS id, client_ip, user_id, account_id,
    operation AS what, diagnosis_class, if(diagnosis_service != '', diagnosis_service, root_service) AS service,
    if(client_status = 'error' OR server_status = 'error', 'error', 'ok') AS status,
    greatest(client_duration_us, server_duration_us) AS duration_us, diagnosis_evidence AS detail, drill
FROM requests FINAL
UNION ALL
SELECT
    received_at AS at, 'report' AS kind, report_id AS id, client_ip, user_id, account_id,
    concat('fault report: ', user_message) AS what, diagnosis_class, diagnosis_service AS service,
    if(diagnosis_class = '', 'pending', 'diagnosed') AS status, toUInt64(0) AS duration_us,
    if(diagnosis_surfaced_as != '', concat(title, ' (traced to ', misuse_detection_id, ', surfaced as ',
                                           diagnosis_surfaced_as, ')'), title) AS detail, drill
FROM fault_reports_diagnosed
UNION ALL
SELECT
    at, 'misuse' AS kind, detection_id AS id, '' AS client_ip, user_id, account_id,
    concat('misuse: ', code, ' (', rule, ')') AS what, 'client_misuse' AS diagnosis_class, '' AS service,
    'detected' AS status, toUInt64(0) AS duration_us, evidence AS detail, drill
FROM misuse_detections FINAL;
