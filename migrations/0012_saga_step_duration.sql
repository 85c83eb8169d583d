-- How long each step attempt took (issue: the admin history tells the whole story). Rows written
-- before this migration keep a null duration.
alter table saga_steps add column if not exists duration_ms integer;
