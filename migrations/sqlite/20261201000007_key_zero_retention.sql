-- Zero-retention keys: Relay stores none of their content (no Responses state, no content in logs).
ALTER TABLE api_keys ADD COLUMN zero_retention BOOLEAN NOT NULL DEFAULT FALSE;
