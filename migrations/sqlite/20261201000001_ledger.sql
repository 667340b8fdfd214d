-- Billing you can audit: usage records gain their provenance, prices become versioned rows, and every
-- billed request posts one balanced, immutable set of ledger entries (corrections are new transactions).
-- Money is integer micro-units; times are UTC unix milliseconds.

-- The client's own x-request-id (correlation only; request_id is Relay's billing id) and where the token
-- numbers came from: provider | counted | estimated.
ALTER TABLE usage_records ADD COLUMN client_request_id TEXT NOT NULL DEFAULT '';
ALTER TABLE usage_records ADD COLUMN input_source TEXT NOT NULL DEFAULT 'provider';
ALTER TABLE usage_records ADD COLUMN output_source TEXT NOT NULL DEFAULT 'provider';
-- What the customer is charged (cost_micros stays what the provider charges Relay) and at which price.
ALTER TABLE usage_records ADD COLUMN sell_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN price_id TEXT NOT NULL DEFAULT '';
CREATE INDEX usage_records_time ON usage_records (started_at_ms);

-- One row per price version. A model's price changes by closing the old row (valid_to_ms) and adding a new
-- one; rows are never edited in place once a posting references them.
CREATE TABLE prices (
    id                      TEXT PRIMARY KEY,   -- "<provider>/<model>@<valid_from_ms>"
    provider                TEXT NOT NULL,      -- provider name from the adapter config, or '*'
    model                   TEXT NOT NULL,      -- upstream model name; a trailing '*' matches a prefix
    currency                TEXT NOT NULL,
    input_per_mtok          BIGINT NOT NULL,
    output_per_mtok         BIGINT NOT NULL,
    cached_input_per_mtok   BIGINT NOT NULL,
    cache_write_per_mtok    BIGINT NOT NULL,
    reasoning_per_mtok      BIGINT NOT NULL,    -- 0 = reasoning tokens are output tokens
    per_request             BIGINT NOT NULL,
    valid_from_ms           BIGINT NOT NULL,
    valid_to_ms             BIGINT NOT NULL,    -- 0 = still valid
    source                  TEXT NOT NULL,      -- where the numbers come from, and when they were read
    created_at_ms           BIGINT NOT NULL
);
CREATE INDEX prices_model ON prices (model);

CREATE TABLE ledger_accounts (
    id              TEXT PRIMARY KEY,   -- e.g. customer:key:<id>, revenue, provider_payable:<provider>
    kind            TEXT NOT NULL,      -- customer | revenue | cost | payable | prepaid | funds | adjustment
    currency        TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL
);

-- A posting set. request_id is unique: one posting set per billed request, however often its event arrives.
CREATE TABLE ledger_transactions (
    id              TEXT PRIMARY KEY,   -- UUIDv7
    request_id      TEXT UNIQUE,        -- NULL for top-ups and adjustments
    kind            TEXT NOT NULL,      -- usage | topup | adjustment
    price_id        TEXT NOT NULL,
    memo            TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL
);

-- Debits are positive, credits negative; each transaction's entries sum to zero per currency.
CREATE TABLE ledger_entries (
    txn_id          TEXT NOT NULL REFERENCES ledger_transactions (id),
    seq             INTEGER NOT NULL,
    account_id      TEXT NOT NULL REFERENCES ledger_accounts (id),
    amount_micros   BIGINT NOT NULL,
    currency        TEXT NOT NULL,
    PRIMARY KEY (txn_id, seq)
);
CREATE INDEX ledger_entries_account ON ledger_entries (account_id);

-- Usage events billing could not store after its retries (bad data, not outages): kept whole for replay.
CREATE TABLE usage_dead_letters (
    id              TEXT PRIMARY KEY,   -- UUIDv7
    request_id      TEXT NOT NULL,
    reason          TEXT NOT NULL,
    event           BLOB NOT NULL,
    created_at_ms   BIGINT NOT NULL
);
