-- Per-key response cache opt-in: seconds to cache this key's answers (0 = the model group's setting).
ALTER TABLE api_keys ADD COLUMN response_cache_ttl_secs BIGINT NOT NULL DEFAULT 0;
