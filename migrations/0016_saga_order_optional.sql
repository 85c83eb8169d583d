-- A saga need not place an order: only CreateOrder's sagas (and their idempotency records) name
-- one; a saga of another type has a null order_id. Every row written before this migration keeps
-- its order.
alter table sagas alter column order_id drop not null;
alter table idempotency_keys alter column order_id drop not null;
