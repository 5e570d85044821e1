-- One row per correlated request; a request may be emitted again with more spans, and
-- the highest version wins (ReplacingMergeTree(version) keyed by request id alone, so
-- a later version replaces an earlier one even when it learnt the client IP).
CREATE TABLE IF NOT EXISTS requests
(
    request_id          String,
    version             UInt32,
    start               DateTime64(6, 'UTC'),
    trace_id            String,
    operation           LowCardinality(String),
    user_id             String,
    account_id          String,
    client_ip           String,
    app_version         LowCardinality(String),
    platform            LowCardinality(String),
    region              LowCardinality(String),
    isp                 LowCardinality(String),
    asn                 UInt32,
    connection_type     LowCardinality(String),
    has_client          Bool,
    has_server          Bool,
    client_duration_us  UInt64,
    client_status       LowCardinality(String),
    client_http_status  UInt16,
    client_error_code   LowCardinality(String),
    server_duration_us  UInt64,
    server_status       LowCardinality(String),
    server_http_status  UInt16,
    root_service        LowCardinality(String),
    teams               Array(LowCardinality(String)),
    hops                String,                 -- JSON list of hops, as on the topic
    span_count          UInt32,
    diagnosis_class     LowCardinality(String),
    diagnosis_service   LowCardinality(String),
    diagnosis_team      LowCardinality(String),
    diagnosis_code      LowCardinality(String),
    diagnosis_evidence  String,
    catalog_version     UInt32,
    completeness        LowCardinality(String),
    drill               Bool
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMMDD(start)
ORDER BY request_id
SETTINGS index_granularity = 1024;

-- The support lookups' index: who (client IP, user, account) → which requests, in time
-- order. Narrow rows sorted for the lookups; the wide rows are then fetched by request id.
CREATE TABLE IF NOT EXISTS request_index
(
    key_kind    LowCardinality(String),  -- ip | user | account
    key         String,
    start       DateTime64(6, 'UTC'),
    request_id  String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMMDD(start)
ORDER BY (key_kind, key, start, request_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS request_index_mv TO request_index AS
SELECT kv.1 AS key_kind, kv.2 AS key, start, request_id
FROM requests
ARRAY JOIN [('ip', client_ip), ('user', user_id), ('account', account_id)] AS kv
WHERE kv.2 != '';
