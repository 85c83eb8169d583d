-- Outbox rows Kafka refuses for good (larger than the broker accepts, an invalid topic name, ...):
-- the relay moves them here, out of the publishing path, instead of retrying them forever while
-- every later row waits (docs/outbox.md, "A row Kafka refuses"). The id is the outbox row's own;
-- an operator can replay one (it goes back to the outbox, same eventID) once the cause is fixed.
create table outbox_dead_letters (
    id          bigint primary key,
    topic       text not null,
    message_key text not null,
    event_id    uuid not null,
    event_type  text not null,
    payload     jsonb not null,
    headers     jsonb not null,
    created_at  timestamptz not null,
    failed_at   timestamptz not null default now(),
    error       text not null,
    replayed_at timestamptz
);
