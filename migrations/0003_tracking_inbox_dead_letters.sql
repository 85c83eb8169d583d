-- The tracking consumer's tables: the inbox (TrackingEvents already handled, by eventID), events parked
-- until their order is known, and dead letters. Plus what the outbox relay's retention and the outbox
-- backlog report use.

-- One row per TrackingEvent handled, written in the transaction that applied it: a redelivered or
-- duplicated event finds its eventID here and changes nothing.
create table tracking_inbox (
    event_id        uuid primary key,
    order_id        int not null,
    tracking_status text not null,
    -- What handling the event did: applied, notified, unchanged, late, replayed_*.
    outcome         text not null,
    occurred_at     timestamptz,
    processed_at    timestamptz not null default now()
);
create index tracking_inbox_processed_idx on tracking_inbox (processed_at);

-- TrackingEvents whose order is not known yet (or still pending), retried with backoff until the
-- window closes, then dead-lettered. Their offsets are committed: they never hold up a partition.
create table tracking_retries (
    id              bigserial primary key,
    event_id        uuid not null unique,
    order_id        int not null,
    topic           text not null,
    partition       int,
    "offset"        bigint,
    key             bytea,
    payload         bytea not null,
    headers         jsonb not null default '{}',
    attempts        int not null default 0,
    first_seen_at   timestamptz not null default now(),
    next_attempt_at timestamptz not null,
    last_error      text
);
create index tracking_retries_due_idx on tracking_retries (next_attempt_at);
create index tracking_retries_order_idx on tracking_retries (order_id, id);

-- Messages that could not be applied: the raw bytes as received, and why.
create table dead_letters (
    id          bigserial primary key,
    topic       text not null,
    -- Null when the event did not come from a Kafka record (applied directly).
    partition   int,
    "offset"    bigint,
    key         bytea,
    payload     bytea not null,
    headers     jsonb not null default '{}',
    reason      text not null,
    at          timestamptz not null default now(),
    replayed_at timestamptz
);
-- A record redelivered after a crash is dead-lettered once.
create unique index dead_letters_record_key on dead_letters (topic, partition, "offset")
    where partition is not null and "offset" is not null;

-- Published rows by publication time, for the retention cleanup.
create index outbox_published_idx on outbox (published_at) where published_at is not null;

-- Rows the relay published, per second (written with each batch's marks): `publishedLastMinute`
-- without scanning the outbox, also when published rows are deleted at once (zero retention).
create table outbox_relay_stats (
    second    timestamptz primary key,
    published bigint not null
);
