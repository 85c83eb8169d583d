-- Orders (the seed's data model), the saga engine's tables, idempotency keys and the outbox.

create table orders (
    order_id      serial primary key,
    user_id       int not null references users (user_id),
    order_date    timestamptz not null default now(),
    status        text not null check (status in ('pending', 'confirmed', 'shipped', 'delivered', 'cancelled', 'rejected')),
    -- Known once persist_order ran (prices come from the catalog).
    total_amount  numeric(10, 2) check (total_amount >= 0),
    currency      text check (currency ~ '^[A-Z]{3}$'),
    shipment_id   text,
    status_reason text,
    saga_id       uuid not null unique,
    updated_at    timestamptz not null default now()
);
create index orders_user_newest_idx on orders (user_id, order_id desc);
create trigger orders_updated_at before update on orders for each row execute function set_updated_at();

create table order_items (
    order_item_id serial primary key,
    order_id      int not null references orders (order_id) on delete cascade,
    product_id    int not null check (product_id > 0),
    quantity      int not null check (quantity between 1 and 10000),
    price         numeric(10, 2) not null check (price >= 0),
    unique (order_id, product_id)
);

create table sagas (
    saga_id            uuid primary key,
    saga_type          text not null,
    definition_version int not null,
    -- No foreign key: a stock refusal answered synchronously removes the placeholder order.
    order_id           int not null,
    user_id            int not null,
    state              text not null check (state in ('running', 'compensating', 'completed', 'compensated', 'failed', 'stuck')),
    -- Index of the step whose action (running) or compensation (compensating) runs next.
    step               int not null,
    -- Name of that action or compensation (for a finished saga: the step that failed, or the last).
    step_name          text not null default '',
    -- Attempts already made of that action or compensation.
    attempt            int not null default 0,
    -- When the next attempt is due; null when nothing is due (terminal, stuck).
    next_attempt_at    timestamptz,
    -- Row lease: one worker at a time; `fence` grows with every claim, and every write checks it.
    lease_owner        text,
    lease_expires_at   timestamptz,
    fence              bigint not null default 0,
    input              jsonb not null,
    -- Outputs of the steps (reservation, prices, shipment id).
    data               jsonb not null default '{}',
    -- Why the saga compensates: {"class", "detail", "unavailable"?}.
    failure            jsonb,
    last_error         text,
    last_error_class   text,
    cancel_requested   text,
    -- The creating request answered 202 (so a stock refusal leaves a visible `rejected` order).
    answered_pending   boolean not null default false,
    -- The answer POST /orders gives (and replays) once the saga has finished: {status, body}.
    answer             jsonb,
    trace_context      jsonb not null default '{}',
    deadline_at        timestamptz not null,
    created_at         timestamptz not null default now(),
    updated_at         timestamptz not null default now(),
    finished_at        timestamptz
);
create index sagas_due_idx on sagas (next_attempt_at) where next_attempt_at is not null;
create index sagas_state_updated_idx on sagas (state, updated_at desc);
create index sagas_created_idx on sagas (created_at desc, saga_id desc);
create index sagas_order_idx on sagas (order_id);
create index sagas_step_name_idx on sagas (step_name, state);

-- Every attempt of every action and compensation.
create table saga_steps (
    id                bigserial primary key,
    saga_id           uuid not null references sagas (saga_id) on delete cascade,
    step              text not null,
    kind              text not null check (kind in ('action', 'compensation')),
    attempt           int not null,
    started_at        timestamptz not null,
    finished_at       timestamptz not null default now(),
    outcome           text not null check (outcome in ('succeeded', 'retry_scheduled', 'failed', 'interrupted', 'skipped')),
    error_class       text,
    error             text,
    idempotency_key   text,
    downstream_status int,
    -- The worker that ran the attempt.
    worker            text
);
create index saga_steps_saga_idx on saga_steps (saga_id, id);

-- Idempotency-Key of POST /orders, scoped per user.
create table idempotency_keys (
    user_id      int not null references users (user_id),
    key          text not null,
    request_hash bytea not null,
    saga_id      uuid not null,
    order_id     int not null,
    created_at   timestamptz not null default now(),
    primary key (user_id, key)
);

-- Transactional outbox: rows written with the state change they describe, published by the relay.
create table outbox (
    id           bigserial primary key,
    topic        text not null,
    message_key  text not null,
    event_id     uuid not null unique,
    event_type   text not null,
    payload      jsonb not null,
    headers      jsonb not null default '{}',
    created_at   timestamptz not null default now(),
    published_at timestamptz
);
create index outbox_unpublished_idx on outbox (id) where published_at is null;

create or replace function outbox_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('outbox', '');
    return null;
end;
$$;
create trigger outbox_notify after insert on outbox for each statement execute function outbox_notify();
