-- Idempotency-Keys of finished orders are deleted after IDEMPOTENCY_KEY_RETENTION_SECONDS by the
-- API's housekeeping (every minute): it finds them by age.
create index idempotency_keys_created_idx on idempotency_keys (created_at);
