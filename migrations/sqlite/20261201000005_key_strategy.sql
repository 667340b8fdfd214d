-- Per-key routing strategy override (weighted, priority, cost, latency, balanced, headroom); '' = the group's.
ALTER TABLE api_keys ADD COLUMN routing_strategy TEXT NOT NULL DEFAULT '';
