-- No planner statistics for the columns that hold documents (docs/performance.md, finding 38).
-- Autovacuum analyzes `sagas` about once a minute under load, and computing statistics for its JSON
-- columns (a 30,000-row sample, each value detoasted and compared) took a whole core for 1–1.2 s on
-- a 2-core machine: every order in flight waited behind it, the half-rate tail's largest stalls.
-- No statement filters, joins or sorts on these columns (they are read and written by key), so
-- the planner loses nothing; `ANALYZE sagas` takes about a quarter of the time without them.
alter table sagas
    alter column input set statistics 0,
    alter column data set statistics 0,
    alter column failure set statistics 0,
    alter column last_error set statistics 0,
    alter column answer set statistics 0,
    alter column trace_context set statistics 0;
alter table outbox
    alter column payload set statistics 0,
    alter column headers set statistics 0;
