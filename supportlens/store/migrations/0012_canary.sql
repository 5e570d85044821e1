-- Canary findings (issue #17): surge events of kind `canary`, a rolling-out version that fails
-- more than the one it replaces (streams/canary.py). Their score is 1 - p-value, not the
-- detector's: the surge panels keep to kind 'surge', the canary panel to 'canary'.
ALTER TABLE surges
    ADD COLUMN IF NOT EXISTS kind LowCardinality(String) DEFAULT 'surge' AFTER phase;
