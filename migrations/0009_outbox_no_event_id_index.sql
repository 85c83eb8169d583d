-- One index fewer per outbox row (docs/performance.md): the unique index on `event_id` cost every
-- event an index insertion and a uniqueness check, for one reader, the replay of a dead letter,
-- which used it to do nothing when its copy was still queued. Event ids are UUIDv7 the service
-- makes, unique by construction; the replay now remembers the copy it queued (`replayed_as`) and
-- looks it up by primary key.
alter table outbox drop constraint if exists outbox_event_id_key;
alter table outbox_dead_letters add column replayed_as bigint;
