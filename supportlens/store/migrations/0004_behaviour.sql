-- Consent-gated behaviour events, per user in time order.
CREATE TABLE IF NOT EXISTS behaviour
(
    user_id      String,
    ts           DateTime64(6, 'UTC'),
    event_id     String,
    account_id   String,
    name         LowCardinality(String),
    screen       LowCardinality(String),
    app_version  LowCardinality(String),
    platform     LowCardinality(String),
    region       LowCardinality(String),
    attributes   Map(String, String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMMDD(ts)
ORDER BY (user_id, ts, event_id);
