-- Surges, incidents, customer notifications and their delivery attempts (DESIGN.md §5–6).

-- Each surge event once; ordered for "what surged in this dimension, lately".
CREATE TABLE IF NOT EXISTS surges
(
    dimension         LowCardinality(String),
    value             String,
    at                DateTime64(6, 'UTC'),
    surge_id          String,
    phase             LowCardinality(String),   -- start | update | end
    started_at        DateTime64(6, 'UTC'),
    score             Float32,
    rate_per_min      Float32,
    baseline_per_min  Float32,
    reports           UInt32,
    failed_requests   UInt32,
    affected_users    UInt32,
    drill             Bool,
    attributes        Map(String, String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (dimension, value, at, surge_id, phase);

-- Every transition of every incident; the highest sequence is its current state
-- (`incidents_current` below).
CREATE TABLE IF NOT EXISTS incidents
(
    incident_id     String,
    sequence        UInt32,
    transition      LowCardinality(String),     -- declared | updated | escalated | mitigated | resolved
    at              DateTime64(6, 'UTC'),
    started_at      DateTime64(6, 'UTC'),
    resolved_at     Nullable(DateTime64(6, 'UTC')),
    severity        LowCardinality(String),
    title           String,
    reason          String,
    root_key        String,
    dimensions      Map(LowCardinality(String), String),
    services        Array(LowCardinality(String)),
    teams           Array(LowCardinality(String)),
    affected_users  UInt32,
    declared_by     String,
    drill           Bool,
    attributes      Map(String, String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(started_at)
ORDER BY (incident_id, sequence);

CREATE VIEW IF NOT EXISTS incidents_current AS
SELECT
    incident_id,
    max(sequence) AS last_sequence,
    argMax(transition, sequence) AS state,
    min(started_at) AS started_at,
    argMax(resolved_at, sequence) AS resolved_at,
    argMax(severity, sequence) AS severity,
    argMax(title, sequence) AS title,
    argMax(reason, sequence) AS reason,
    argMax(root_key, sequence) AS root_key,
    argMax(dimensions, sequence) AS dimensions,
    argMax(services, sequence) AS services,
    argMax(teams, sequence) AS teams,
    argMax(affected_users, sequence) AS affected_users,
    argMax(drill, sequence) AS drill
FROM incidents FINAL
GROUP BY incident_id;

-- The outbox, one row per idempotency key (a re-sent record replaces, never adds).
CREATE TABLE IF NOT EXISTS notifications
(
    account_id       String,
    notification_id  String,
    created_at       DateTime64(6, 'UTC'),
    kind             LowCardinality(String),
    incident_id      String,
    channel          LowCardinality(String),
    locale           LowCardinality(String),
    subject          String,
    body             String,
    drill            Bool,
    attributes       Map(String, String)
)
ENGINE = ReplacingMergeTree(created_at)
PARTITION BY toYYYYMM(created_at)
ORDER BY (account_id, notification_id);

-- Every delivery attempt and its outcome.
CREATE TABLE IF NOT EXISTS notification_deliveries
(
    notification_id  String,
    attempt          UInt16,
    account_id       String,
    at               DateTime64(6, 'UTC'),
    channel          LowCardinality(String),
    outcome          LowCardinality(String),
    detail           String,
    drill            Bool
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (notification_id, attempt);
