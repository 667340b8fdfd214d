-- Files and Batches APIs, owned by an org. File content, batch objects, the principal a batch runs as
-- and each line's answer are encrypted (AES-256-GCM, key from [state]). A batch is leased to one runner
-- at a time (lease_until_ms), so a crashed runner's batch is picked up by another and resumed after the
-- lines it answered.
CREATE TABLE files (
    org_id TEXT NOT NULL,
    id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    content BYTEA NOT NULL,
    PRIMARY KEY (org_id, id)
);
CREATE INDEX files_org_created ON files (org_id, created_at_ms);
CREATE INDEX files_expiry ON files (expires_at_ms);
CREATE TABLE batches (
    org_id TEXT NOT NULL,
    id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    status TEXT NOT NULL,
    runner TEXT NOT NULL,
    lease_until_ms BIGINT NOT NULL,
    object BYTEA NOT NULL,
    principal BYTEA NOT NULL,
    PRIMARY KEY (org_id, id)
);
CREATE INDEX batches_org_created ON batches (org_id, created_at_ms);
CREATE INDEX batches_work ON batches (status, lease_until_ms);
CREATE TABLE batch_results (
    org_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    line BIGINT NOT NULL,
    ok BIGINT NOT NULL,
    result BYTEA NOT NULL,
    PRIMARY KEY (org_id, batch_id, line)
);
