-- The org -> team -> key hierarchy. Each level carries its own limits and budget (0 = none).
-- Keys are `rk_<id>_<secret>`: only HMAC-SHA256(pepper, secret) is stored, never the secret.
-- Times are UTC unix milliseconds; money is integer micro-units.
CREATE TABLE orgs (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    enabled         BOOLEAN NOT NULL,
    rpm             BIGINT NOT NULL,
    tpm             BIGINT NOT NULL,
    max_concurrent  BIGINT NOT NULL,
    budget_micros   BIGINT NOT NULL,
    budget_period   TEXT NOT NULL,          -- daily | monthly | total
    metadata        TEXT NOT NULL,          -- JSON object
    created_at_ms   BIGINT NOT NULL
);

CREATE TABLE teams (
    id              TEXT PRIMARY KEY,
    org_id          TEXT NOT NULL REFERENCES orgs (id),
    name            TEXT NOT NULL,
    enabled         BOOLEAN NOT NULL,
    rpm             BIGINT NOT NULL,
    tpm             BIGINT NOT NULL,
    max_concurrent  BIGINT NOT NULL,
    budget_micros   BIGINT NOT NULL,
    budget_period   TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id              TEXT PRIMARY KEY,       -- the public part of the key, safe to log
    team_id         TEXT NOT NULL REFERENCES teams (id),
    name            TEXT NOT NULL,
    secret_hash     BYTEA NOT NULL,         -- HMAC-SHA256(pepper, secret)
    allowed_models  TEXT NOT NULL,          -- JSON array of names / globs; [] = all
    ip_allowlist    TEXT NOT NULL,          -- JSON array of IPs / CIDRs; [] = anywhere
    enabled         BOOLEAN NOT NULL,
    expires_at_ms   BIGINT NOT NULL,        -- 0 = never
    revoked_at_ms   BIGINT NOT NULL,        -- 0 = not revoked
    rpm             BIGINT NOT NULL,
    tpm             BIGINT NOT NULL,
    max_concurrent  BIGINT NOT NULL,
    budget_micros   BIGINT NOT NULL,
    budget_period   TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL
);

CREATE INDEX api_keys_team ON api_keys (team_id);
CREATE INDEX teams_org ON teams (org_id);
