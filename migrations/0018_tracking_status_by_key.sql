-- The tracking consumer's status changes of a batch (`tracking::plan`, `Plan::write`) as a function
-- whose cached plan can only look orders up by key, like migration 0017's: one round trip and no
-- planning per batch, where the statement it replaces was planned at every batch (a generic plan
-- made while `orders` was small joined it by a sequential scan; docs/performance.md, findings 8
-- and 25). The batch's orders are locked already (`for update skip locked`, in key order).
create function order_status_many(order_ids int[], statuses text[], reasons text[])
returns int
language plpgsql
set enable_seqscan = off set enable_hashjoin = off set enable_mergejoin = off
as $$
declare
    changed int;
begin
    update orders o
       set status = u.status, status_reason = u.reason
      from unnest(order_ids, statuses, reasons) as u(order_id, status, reason)
     where o.order_id = u.order_id;
    get diagnostics changed = row_count;
    return changed;
end
$$;
