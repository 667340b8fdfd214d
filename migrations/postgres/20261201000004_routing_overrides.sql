-- Routing changes made at runtime (admin API / `relay routing`): one row per changed deployment or model
-- group, its settings a JSON object that relay-routing validates. Every routing replica reloads them.
CREATE TABLE routing_overrides (
    target_kind TEXT NOT NULL,
    target TEXT NOT NULL,
    settings TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (target_kind, target)
);
