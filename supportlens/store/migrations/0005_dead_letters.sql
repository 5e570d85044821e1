-- Records no stage could accept, with the reason and where they came from. One row per
-- source record: its origin (topic, partition, offset) is the key.
CREATE TABLE IF NOT EXISTS dead_letters
(
    source_topic      LowCardinality(String),
    source_partition  Int32,
    source_offset     Int64,
    at                DateTime64(3, 'UTC'),
    reason            String,
    key               String,
    value             String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMMDD(at)
ORDER BY (source_topic, source_partition, source_offset);
