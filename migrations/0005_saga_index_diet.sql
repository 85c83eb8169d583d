-- Fewer index writes per saga transition (docs/performance.md). Every transition rewrites the saga
-- row, and `updated_at`, `state` and `step_name` change each time, so no update is HOT and every
-- index of the table takes a new entry. Two of them served only operators' listings:
-- (state, updated_at) and (step_name, state). Operators look for sagas that are not completed
-- (running, compensating, stuck, failed, compensated), which one partial index covers; completed
-- sagas, the vast majority, stay out of it.
drop index if exists sagas_state_updated_idx;
drop index if exists sagas_step_name_idx;
create index sagas_unfinished_idx on sagas (state, step_name, created_at desc) where state <> 'completed';
