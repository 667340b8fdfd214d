-- Data residency: the regions (deployment region tags) a key's requests may be served in; [] = any.
ALTER TABLE api_keys ADD COLUMN allowed_regions TEXT NOT NULL DEFAULT '[]';
