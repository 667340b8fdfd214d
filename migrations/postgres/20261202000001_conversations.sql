-- Conversations API: a conversation of an org and its items, in order. Metadata and items are encrypted
-- (AES-256-GCM, key from [state]); a conversation expires after the retention period counted from its
-- last change, and its items with it.
CREATE TABLE conversations (
    org_id TEXT NOT NULL,
    id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    metadata BYTEA NOT NULL,
    PRIMARY KEY (org_id, id)
);
CREATE INDEX conversations_expiry ON conversations (expires_at_ms);
CREATE TABLE conversation_items (
    org_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    id TEXT NOT NULL,
    item BYTEA NOT NULL,
    PRIMARY KEY (org_id, conversation_id, seq)
);
CREATE UNIQUE INDEX conversation_items_id ON conversation_items (org_id, conversation_id, id);
