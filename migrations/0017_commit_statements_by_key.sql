-- The shared commit's statements that join a table to the commit's arrays (the saga rows, the
-- orders a commit prices or confirms) run as functions whose plans can only look rows up by key:
-- sequential scans, hash and merge joins are switched off inside them. Prepared as plain
-- statements, their generic plan, made while the table was small, joined it by a sequential scan
-- that grew with every row (docs/performance.md, findings 8 and 18); planned at each call instead,
-- they cost a second round trip (parse, then execute) and the planning itself. A prepared call
-- costs one round trip and a cached plan that stays a key lookup however large the table grows
-- (finding 20).

-- The saga rows of a shared commit (`saga::store::STAGE_WRITES_SQL` calls it).
create function saga_update_many(
    ids uuid[], states text[], steps int[], attempts int[], next_attempts timestamptz[],
    datas jsonb[], failures jsonb[], last_errors text[], last_error_classes text[], keeps bool[],
    answers jsonb[], finisheds bool[], step_names text[], lease interval, sessions jsonb[])
returns void
language plpgsql
set enable_seqscan = off set enable_hashjoin = off set enable_mergejoin = off
as $$
begin
    update sagas s
       set state = u.state, step = u.step, attempt = u.attempt, next_attempt_at = u.next_attempt_at,
           data = u.data, failure = u.failure, last_error = u.last_error,
           last_error_class = u.last_error_class,
           lease_owner = case when u.keep then s.lease_owner end,
           lease_expires_at = case when u.keep then now() + lease end,
           answer = coalesce(s.answer, u.answer), updated_at = now(),
           finished_at = case when u.finished then now() end, step_name = u.step_name,
           trace_context = case when u.session is null then s.trace_context
                                else s.trace_context || u.session end
      from unnest(ids, states, steps, attempts, next_attempts, datas, failures, last_errors,
                  last_error_classes, keeps, answers, finisheds, step_names, sessions)
           as u(saga_id, state, step, attempt, next_attempt_at, data, failure, last_error,
                last_error_class, keep, answer, finished, step_name, session)
     where s.saga_id = u.saga_id;
end
$$;

-- The priced lines and totals of a shared commit's orders, the `persist_order` step
-- (`orders::store::PERSIST_ORDER_SQL` calls it): the order rows are locked in key order first, as
-- every writer of `orders` does; returns the lines with their ids.
create function order_persist_many(
    line_orders int[], products int[], quantities int[], prices numeric[],
    order_ids int[], totals numeric[], currencies text[])
returns table (item_id int, item_order int, item_product int, item_quantity int, item_price numeric)
language plpgsql
set enable_seqscan = off set enable_hashjoin = off set enable_mergejoin = off
as $$
begin
    return query
    with t as (select * from unnest(order_ids, totals, currencies) as t(order_id, total, currency)),
         before as (select o.order_id from orders o where o.order_id = any(order_ids)
                     order by o.order_id for update),
         i as (insert into order_items (order_id, product_id, quantity, price)
               select * from unnest(line_orders, products, quantities, prices)
               returning order_item_id, order_id, product_id, quantity, price),
         u as (update orders o set total_amount = t.total, currency = t.currency
                 from t join before b using (order_id)
                where o.order_id = t.order_id)
    select i.order_item_id, i.order_id, i.product_id, i.quantity, i.price from i;
end
$$;

-- The shipments on their orders, and `pending` → `confirmed` (`orders::store::CONFIRM_ORDER_SQL`
-- calls it): the rows are locked in key order first; returns each order with whether it was
-- pending.
create function order_confirm_many(order_ids int[], shipment_ids text[])
returns table (confirmed_order int, was_pending bool)
language plpgsql
set enable_seqscan = off set enable_hashjoin = off set enable_mergejoin = off
as $$
begin
    return query
    with t as (select * from unnest(order_ids, shipment_ids) as t(order_id, shipment_id)),
         before as (select o.order_id, o.status from orders o
                     where o.order_id = any(order_ids) order by o.order_id for update)
    update orders o
       set shipment_id = t.shipment_id,
           status = case when o.status = 'pending' then 'confirmed' else o.status end
      from t join before b using (order_id)
     where o.order_id = t.order_id
 returning o.order_id, b.status = 'pending';
end
$$;
