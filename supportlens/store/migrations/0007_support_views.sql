-- Views for support staff who query ClickHouse directly (README "Querying ClickHouse").

CREATE VIEW IF NOT EXISTS fault_reports_diagnosed AS
SELECT
    r.report_id AS report_id, r.received_at AS received_at, r.client_ip AS client_ip,
    r.user_id AS user_id, r.account_id AS account_id, r.locale AS locale,
    r.app_version AS app_version, r.platform AS platform, r.region AS region,
    r.isp AS isp, r.connection_type AS connection_type, r.request_ids AS request_ids,
    r.error_code AS error_code, r.user_message AS user_message,
    d.diagnosis_class AS diagnosis_class, d.diagnosis_service AS diagnosis_service,
    d.diagnosis_team AS diagnosis_team, d.diagnosis_code AS diagnosis_code,
    d.title AS title, d.explanation AS explanation, d.action AS action, d.doc_url AS doc_url,
    d.diagnosed_at AS diagnosed_at, d.drill AS drill
FROM fault_reports AS r FINAL
LEFT JOIN (SELECT * FROM report_diagnoses FINAL) AS d ON d.report_id = r.report_id
SETTINGS join_use_nulls = 0;

-- One customer's story: their requests and their fault reports in time order.
-- SELECT * FROM customer_timeline WHERE client_ip = '203.0.113.7' AND at > now() - INTERVAL 1 DAY ORDER BY at
CREATE VIEW IF NOT EXISTS customer_timeline AS
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
    if(diagnosis_class = '', 'pending', 'diagnosed') AS status, toUInt64(0) AS duration_us, title AS detail, drill
FROM fault_reports_diagnosed;

-- Global problem trends over any period: filter on `minute`, group as you need.
-- SELECT diagnosis_class, service, sum(requests) FROM top_problems WHERE minute > now() - INTERVAL 7 DAY GROUP BY ALL ORDER BY 3 DESC
CREATE VIEW IF NOT EXISTS top_problems AS
SELECT
    minute, diagnosis_class, service, region, isp, connection_type, app_version, platform, drill,
    uniqMerge(requests) AS requests, uniqMerge(users) AS users
FROM problem_trends
WHERE diagnosis_class != 'ok'
GROUP BY minute, diagnosis_class, service, region, isp, connection_type, app_version, platform, drill;
