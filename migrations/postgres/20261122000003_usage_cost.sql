-- What each request cost at its deployment's price, in integer micro-units (0 when unpriced).
ALTER TABLE usage_records ADD COLUMN cost_micros BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN currency TEXT NOT NULL DEFAULT 'USD';
