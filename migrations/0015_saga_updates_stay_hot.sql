-- Saga transitions that stay HOT (docs/performance.md, finding 16). A transition that leaves a saga
-- running (the step moves on, `next_attempt_at` and `step_name` change) rewrote every index of the
-- table, because two indexes covered columns it changes: the poller's (`next_attempt_at`) and the
-- operators' (`state, step_name, created_at`). Now no index covers a column such a transition
-- changes, and the table keeps room on each page for the new row version, so PostgreSQL writes it
-- beside the old one with no index entry at all (a heap-only tuple). Only a change of state
-- (completed, compensating, stuck, ...) still writes index entries.
--
-- The poller finds due sagas through the operators' index: the open ones (running, compensating)
-- are its leading entries, and their due time is read from the row. Its cost follows the number
-- of open sagas, not the table's size.
drop index if exists sagas_due_idx;
drop index if exists sagas_unfinished_idx;
create index sagas_unfinished_idx on sagas (state, created_at desc) where state <> 'completed';
-- Room for HOT versions: a saga row is rewritten two or three times in its first second; an order
-- row by its saga and by each tracking event.
alter table sagas set (fillfactor = 50);
alter table orders set (fillfactor = 80);
