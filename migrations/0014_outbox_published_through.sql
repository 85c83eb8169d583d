-- The relay no longer marks each row it published (docs/outbox.md, docs/performance.md finding 15).
-- Marking cost every outbox row a second, non-HOT row version and a primary-key entry, on top of
-- the entry in the partial index of unpublished rows that each insert made. Now "published" is a
-- high-water mark: every row with an id up to `outbox_relay_floor.through` has been acknowledged
-- by the broker (or set aside as a dead letter). The relay raises it once every transaction that
-- could still add a row below it has ended (migration 0013: a transaction takes its xid before its
-- outbox id), so a row is never counted published before it was.
create table outbox_relay_floor (
    singleton boolean primary key default true check (singleton),
    through   bigint not null
);

-- Where the old marks left off: below the oldest unpublished row (or past the newest row when none
-- is pending). Rows above it that were already published are published once more (at-least-once).
insert into outbox_relay_floor (through)
select coalesce((select min(id) - 1 from outbox where published_at is null),
                (select max(id) from outbox),
                0);

-- When each id was published, to the second: the per-second row of the relay's statistics records
-- how far the floor had risen by then. The retention cleanup and the console read it.
alter table outbox_relay_stats add column published_through bigint;
insert into outbox_relay_stats (second, published, published_through)
select date_trunc('second', now()), 0, through from outbox_relay_floor
on conflict (second) do update set published_through = excluded.published_through;
create index outbox_relay_stats_through_idx on outbox_relay_stats (published_through)
    where published_through is not null;

-- Readers (metrics, tests, the chaos suite's checks) ask these instead of a column.
create function outbox_published_through() returns bigint
    language sql stable
    as $$ select through from outbox_relay_floor $$;

-- When row `id` was published (to the second), null while it is not.
create function outbox_published_at(id bigint) returns timestamptz
    language sql stable
    as $$ select min(second) from outbox_relay_stats
          where published_through >= id and id <= (select through from outbox_relay_floor) $$;

drop index if exists outbox_unpublished_idx;
alter table outbox drop column published_at;
