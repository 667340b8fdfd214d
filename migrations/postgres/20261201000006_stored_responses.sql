-- Responses API state (store / previous_response_id / item_reference): each response and each of its
-- items, owned by an org. Bodies are encrypted (AES-256-GCM, key from [state]); expired rows are purged.
CREATE TABLE stored_responses (
    org_id TEXT NOT NULL,
    id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    previous_response_id TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    response BYTEA NOT NULL,
    input BYTEA NOT NULL,
    PRIMARY KEY (org_id, id)
);
CREATE INDEX stored_responses_expiry ON stored_responses (expires_at_ms);
CREATE TABLE stored_items (
    org_id TEXT NOT NULL,
    id TEXT NOT NULL,
    response_id TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    item BYTEA NOT NULL,
    PRIMARY KEY (org_id, id)
);
CREATE INDEX stored_items_response ON stored_items (org_id, response_id);
CREATE INDEX stored_items_expiry ON stored_items (expires_at_ms);
