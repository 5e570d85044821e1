-- Landing tables for the high-volume topics: the sink validates each record (msgspec, the
-- same contracts as everywhere) and hands the normalized JSON to ClickHouse, which parses it
-- here (Null engine: nothing is stored) and the views below map it into the real tables.
-- Parsing in ClickHouse instead of building Python rows doubled the sink's throughput
-- (make bench). The mapping is the same as sinks/clickhouse_rows.py's (tests/test_store.py
-- compares both).

CREATE TABLE IF NOT EXISTS spans_landing
(
    request_id      String,
    trace_id        String,
    span_id         String,
    parent_span_id  String,
    side            String,
    service         String,
    operation       String,
    start_us        Int64,
    duration_us     UInt64,
    status          String,
    http_status     Nullable(UInt16),
    error_code      String,
    error_message   String,
    client_ip       String,
    user_id         String,
    account_id      String,
    app_version     String,
    platform        String,
    region          String,
    network         Tuple(isp String, asn UInt32, connection_type String),
    attributes      Map(String, String)
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS spans_landing_mv TO spans AS
SELECT
    request_id, side, span_id, service, fromUnixTimestamp64Micro(start_us, 'UTC') AS start, trace_id,
    parent_span_id, operation, duration_us, status, ifNull(http_status, 0) AS http_status, error_code,
    error_message, client_ip, user_id, account_id, app_version, platform, region,
    network.isp AS isp, network.asn AS asn, network.connection_type AS connection_type, attributes
FROM spans_landing;

CREATE TABLE IF NOT EXISTS requests_landing
(
    request_id          String,
    version             UInt32,
    trace_id            String,
    start_us            Int64,
    operation           String,
    user_id             String,
    account_id          String,
    client_ip           String,
    app_version         String,
    platform            String,
    region              String,
    network             Tuple(isp String, asn UInt32, connection_type String),
    has_client          Bool,
    has_server          Bool,
    client_duration_us  UInt64,
    client_status       String DEFAULT 'ok',
    client_http_status  Nullable(UInt16),
    client_error_code   String,
    server_duration_us  UInt64,
    server_status       String DEFAULT 'ok',
    server_http_status  Nullable(UInt16),
    root_service        String,
    teams               Array(String),
    hops                String DEFAULT '[]',   -- the JSON list, kept as text
    span_count          UInt32,
    diagnosis           Tuple(cls String, service String, team String, code String, evidence String,
                              catalog_version UInt32),
    completeness        String DEFAULT 'complete',
    drill               Bool
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_landing_mv TO requests AS
SELECT
    request_id, version, fromUnixTimestamp64Micro(start_us, 'UTC') AS start, trace_id, operation, user_id,
    account_id, client_ip, app_version, platform, region, network.isp AS isp, network.asn AS asn,
    network.connection_type AS connection_type, has_client, has_server, client_duration_us, client_status,
    ifNull(client_http_status, 0) AS client_http_status, client_error_code, server_duration_us, server_status,
    ifNull(server_http_status, 0) AS server_http_status, root_service, teams, hops, span_count,
    diagnosis.cls AS diagnosis_class, diagnosis.service AS diagnosis_service, diagnosis.team AS diagnosis_team,
    diagnosis.code AS diagnosis_code, diagnosis.evidence AS diagnosis_evidence,
    diagnosis.catalog_version AS catalog_version, completeness, drill
FROM requests_landing;
