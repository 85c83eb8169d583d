-- The functions of migrations 0017 and 0018 were meant to run a plan made once per session: a
-- PL/pgSQL statement's plan is cached, but like a prepared statement's it is a custom plan, made
-- again at every call, until a generic one looks no dearer than the custom ones, and for these
-- statements over arrays it never did: `pg_stat_statements` (with `track_planning`) counted 2,914
-- plans in 3,201 calls of `order_persist_many`'s statement, 0.10 ms of planning a call, and 0.08 ms
-- a call for `order_confirm_many`'s, more than the statements' own 0.15 and 0.09 ms
-- (docs/performance.md, finding 30). Their generic plans are the key lookups the functions' other
-- settings already force (no sequential scan, hash or merge join), whatever the tables' size: each
-- is now planned once per session.
alter function saga_update_many set plan_cache_mode = force_generic_plan;
alter function order_persist_many set plan_cache_mode = force_generic_plan;
alter function order_confirm_many set plan_cache_mode = force_generic_plan;
alter function order_status_many set plan_cache_mode = force_generic_plan;

