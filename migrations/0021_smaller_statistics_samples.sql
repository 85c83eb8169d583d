-- Smaller samples for autovacuum's ANALYZE of the tables every order writes (docs/performance.md,
-- finding 40). Under load these tables grow by more than a tenth a minute, so autovacuum analyzes
-- each of them about once a minute, and each ANALYZE read and sorted a 30,000-row sample (300 times
-- the largest statistics target of a table's columns, 100 by default): 0.1-0.4 s of CPU per table
-- on a 2-core machine, the orders in flight waiting behind it. A target of 10 samples 3,000 rows.
-- What these columns' statistics serve is small: the commit's statements run generic plans forced
-- to key lookups (migrations 0017, 0019), and the other statements filter on keys or on a few
-- states, which 10 most-common values and a 10-bucket histogram describe. Columns left without
-- statistics by migration 0020 stay so.
do $$
declare
    c record;
begin
    for c in
        select a.attrelid::regclass as tbl, a.attname
          from pg_attribute a
         where a.attrelid in ('sagas'::regclass, 'saga_steps'::regclass, 'outbox'::regclass,
                              'orders'::regclass, 'order_items'::regclass, 'idempotency_keys'::regclass)
           and a.attnum > 0 and not a.attisdropped and a.attstattarget <> 0
         order by 1, a.attnum
    loop
        execute format('alter table %s alter column %I set statistics 10', c.tbl, c.attname);
    end loop;
end
$$;
