-- The relay's floor (src/outbox/relay.rs, "A floor under the scan") relies on this: a transaction
-- takes its transaction id before it draws an outbox id, so a row that becomes visible late was
-- written by a transaction that was already running, with its id, when an earlier relay snapshot
-- was taken. (An insert's first row would otherwise draw its id a moment before the transaction
-- gets its xid.) `pg_current_xact_id()` assigns the xid when there is none yet.
create or replace function outbox_next_id() returns bigint
    language sql volatile
    as $$ select case when pg_current_xact_id() is not null then nextval('outbox_id_seq'::regclass) end $$;

alter table outbox alter column id set default outbox_next_id();
-- Ids must be drawn in the order they are asked for, across sessions (no per-session cache).
alter sequence outbox_id_seq cache 1;
