-- One row per request that passed authentication, written by billing from the usage event.
-- request_id is the idempotency key: a redelivered event hits the primary key and changes nothing.
-- Times are UTC unix milliseconds; token counts are exact upstream numbers.
CREATE TABLE usage_records (
    request_id          TEXT PRIMARY KEY,
    schema_version      INTEGER NOT NULL,
    key_id              TEXT NOT NULL,
    team_id             TEXT NOT NULL,
    org_id              TEXT NOT NULL,
    end_user            TEXT NOT NULL,
    model               TEXT NOT NULL,
    deployment_id       TEXT NOT NULL,
    provider            TEXT NOT NULL,
    upstream_model      TEXT NOT NULL,
    protocol            TEXT NOT NULL,
    stream              BOOLEAN NOT NULL,
    input_tokens        INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cache_write_tokens  INTEGER NOT NULL,
    reasoning_tokens    INTEGER NOT NULL,
    outcome             TEXT NOT NULL,      -- success | error | cancelled
    error_code          TEXT NOT NULL,      -- ErrorCode label, '' on success
    http_status         INTEGER NOT NULL,
    started_at_ms       INTEGER NOT NULL,
    duration_ms         INTEGER NOT NULL,
    ttfb_ms             INTEGER NOT NULL,
    attempts            INTEGER NOT NULL,
    recorded_at_ms      INTEGER NOT NULL,
    event               BLOB NOT NULL      -- the event as received (protobuf), for replay and audits
);

CREATE INDEX usage_records_key_time ON usage_records (key_id, started_at_ms);
