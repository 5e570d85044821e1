-- A record on a span topic may carry a batch of spans; a bad span is dead-lettered alone,
-- with its position in the batch (header `source_position`), and its neighbours are kept.
-- Two bad spans of one record are two dead letters: the position joins the key. A record
-- dead-lettered whole has 0 (a record is dead-lettered whole or span by span, never both;
-- ClickHouse forbids a default expression on a column added to the sorting key).
ALTER TABLE dead_letters
    ADD COLUMN IF NOT EXISTS source_position Int32 AFTER source_offset,
    MODIFY ORDER BY (source_topic, source_partition, source_offset, source_position);
