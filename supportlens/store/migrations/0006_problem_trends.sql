-- Per-minute problem trends for dashboards: diagnosis class × service × region ×
-- network × app version × platform → requests and distinct users. Counted as distinct
-- request ids (uniq), so a request delivered twice or emitted again in the same class
-- is counted once.
CREATE TABLE IF NOT EXISTS problem_trends
(
    minute           DateTime('UTC'),
    diagnosis_class  LowCardinality(String),
    service          LowCardinality(String),
    region           LowCardinality(String),
    isp              LowCardinality(String),
    connection_type  LowCardinality(String),
    app_version      LowCardinality(String),
    platform         LowCardinality(String),
    drill            Bool,
    requests         AggregateFunction(uniq, String),
    users            AggregateFunction(uniq, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, diagnosis_class, service, region, isp, connection_type, app_version, platform, drill);

CREATE MATERIALIZED VIEW IF NOT EXISTS problem_trends_mv TO problem_trends AS
SELECT
    toStartOfMinute(start) AS minute,
    diagnosis_class,
    if(diagnosis_service != '', diagnosis_service, root_service) AS service,
    region,
    isp,
    connection_type,
    app_version,
    platform,
    drill,
    uniqState(request_id) AS requests,
    uniqStateIf(user_id, user_id != '') AS users
FROM requests
GROUP BY minute, diagnosis_class, service, region, isp, connection_type, app_version, platform, drill;
