-- Budget counters are rebuilt from the ledger per key, team and org and period: index those reads.
CREATE INDEX usage_records_team_time ON usage_records (team_id, started_at_ms);
CREATE INDEX usage_records_org_time ON usage_records (org_id, started_at_ms);
