-- A leaner outbox row (docs/performance.md, "The relay's cost in PostgreSQL"):
-- * `payload` is `json`, the envelope's text as the service wrote it. As `jsonb` PostgreSQL parsed
--   it into its binary form on every insert and turned it back into text on every relay read,
--   which is all the relay does with it.
-- * no index on `published_at`: each mark inserted an entry in it, only for the retention cleanup,
--   which now walks the primary key from the oldest row instead.
alter table outbox alter column payload type json using payload::json;
drop index if exists outbox_published_idx;
