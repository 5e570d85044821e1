-- Fault reports as users sent them, and their diagnoses as the worker answered them.
-- Kept apart so a report shows up before it is diagnosed; `fault_reports_diagnosed`
-- (0007) joins them. Ordered for "what did this client report, lately".
CREATE TABLE IF NOT EXISTS fault_reports
(
    client_ip        String,
    received_at      DateTime64(6, 'UTC'),
    report_id        String,
    user_id          String,
    account_id       String,
    locale           LowCardinality(String),
    app_version      LowCardinality(String),
    platform         LowCardinality(String),
    region           LowCardinality(String),
    isp              LowCardinality(String),
    asn              UInt32,
    connection_type  LowCardinality(String),
    request_ids      Array(String),
    error_code       LowCardinality(String),
    user_message     String,
    client_log_spans UInt16,
    attributes       Map(String, String),
    INDEX idx_report_id report_id TYPE bloom_filter GRANULARITY 1,
    INDEX idx_user_id user_id TYPE bloom_filter GRANULARITY 1,
    INDEX idx_account_id account_id TYPE bloom_filter GRANULARITY 1
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (client_ip, received_at, report_id);

-- A report may be diagnosed again when its request learns more; the latest diagnosis wins.
CREATE TABLE IF NOT EXISTS report_diagnoses
(
    client_ip          String,
    received_at        DateTime64(6, 'UTC'),
    report_id          String,
    diagnosed_at       DateTime64(6, 'UTC'),
    user_id            String,
    account_id         String,
    locale             LowCardinality(String),
    app_version        LowCardinality(String),
    platform           LowCardinality(String),
    region             LowCardinality(String),
    isp                LowCardinality(String),
    connection_type    LowCardinality(String),
    request_ids        Array(String),
    primary_request_id String,
    diagnosis_class    LowCardinality(String),
    diagnosis_service  LowCardinality(String),
    diagnosis_team     LowCardinality(String),
    diagnosis_code     LowCardinality(String),
    diagnosis_evidence String,
    catalog_version    UInt32,
    title              String,
    explanation        String,
    action             String,
    doc_url            String,
    drill              Bool,
    INDEX idx_report_id report_id TYPE bloom_filter GRANULARITY 1,
    INDEX idx_user_id user_id TYPE bloom_filter GRANULARITY 1,
    INDEX idx_account_id account_id TYPE bloom_filter GRANULARITY 1
)
ENGINE = ReplacingMergeTree(diagnosed_at)
PARTITION BY toYYYYMM(received_at)
ORDER BY (client_ip, received_at, report_id);
