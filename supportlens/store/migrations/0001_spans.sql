-- Every client and server span, as the stream carried it. Looked up by request id
-- (the call-chain waterfall), so the request id leads the key; the same span delivered
-- twice has the same key and collapses (ReplacingMergeTree), and queries read FINAL.
CREATE TABLE IF NOT EXISTS spans
(
    request_id      String,
    side            LowCardinality(String),
    span_id         String,
    service         LowCardinality(String),
    start           DateTime64(6, 'UTC'),
    trace_id        String,
    parent_span_id  String,
    operation       LowCardinality(String),
    duration_us     UInt64,
    status          LowCardinality(String),
    http_status     UInt16,                 -- 0: none
    error_code      LowCardinality(String),
    error_message   String,
    client_ip       String,
    user_id         String,
    account_id      String,
    app_version     LowCardinality(String),
    platform        LowCardinality(String),
    region          LowCardinality(String),
    isp             LowCardinality(String),
    asn             UInt32,
    connection_type LowCardinality(String),
    attributes      Map(String, String),
    INDEX idx_client_ip client_ip TYPE bloom_filter GRANULARITY 4
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMMDD(start)
ORDER BY (request_id, side, span_id, service, start);
