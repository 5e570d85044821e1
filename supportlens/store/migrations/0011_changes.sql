-- Changes (issue #17): deploys, config changes, feature flags, infrastructure changes, as
-- CI/CD pipelines post them (gateway `POST /v1/changes`, the compacted `changes` topic).

-- One row per change id: a change posted again (say, once its rollout finished) replaces
-- the earlier post. No version column: `changes` has one partition, so the sink inserts the
-- posts of a change in the order they were made, re-deliveries included, and the last
-- insert wins. Not partitioned: a row can only replace one in its own partition, and a
-- re-post may move `started_at`; the table stays small (changes are made by people).
CREATE TABLE IF NOT EXISTS changes
(
    change_id     String,
    kind          LowCardinality(String),   -- deploy | config | feature_flag | infra
    service       LowCardinality(String),   -- a backend service or a client app
    version       String,
    from_version  String,
    region        LowCardinality(String),   -- '': every region
    platform      LowCardinality(String),   -- '': every platform
    started_at    DateTime64(6, 'UTC'),
    finished_at   Nullable(DateTime64(6, 'UTC')),
    author        String,
    link          String,
    description   String,
    drill         Bool,
    attributes    Map(String, String)
)
ENGINE = ReplacingMergeTree
ORDER BY change_id;

-- The changes the incident manager named as likely causes, likeliest first: the JSON list of
-- `Suspect` records as on the topic (change_id, kind, service, version, started_at_us, score, reason).
ALTER TABLE incidents
    ADD COLUMN IF NOT EXISTS suspects String DEFAULT '[]' AFTER declared_by;

CREATE OR REPLACE VIEW incidents_current AS
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
    argMax(suspects, sequence) AS suspects,
    argMax(drill, sequence) AS drill
FROM incidents FINAL
GROUP BY incident_id;
