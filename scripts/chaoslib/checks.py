"""The invariants checked once the system has drained."""

import collections
import json
import os
import sqlite3
import subprocess

from .common import ConnError, http

# --------------------------------------------------------------------------------------------
# Checks


class Checks:
    def __init__(self):
        self.rows = []  # (name, ok, figures)

    def add(self, name, ok, figures):
        self.rows.append((name, bool(ok), figures))

    def failed(self):
        return [r for r in self.rows if not r[1]]

    def print(self):
        w = max(len(r[0]) for r in self.rows)
        print()
        print(f"{'check'.ljust(w)}  result  figures")
        print(f"{'-' * w}  ------  {'-' * 60}")
        for name, ok, figures in sorted(self.rows, key=lambda r: r[0]):
            lines = figures.split("\n")
            print(f"{name.ljust(w)}  {'PASS' if ok else 'FAIL':6}  {lines[0]}")
            for extra in lines[1:]:
                print(f"{''.ljust(w)}          {extra}")
        print()


def sample(items, n=5):
    items = list(items)
    return ", ".join(str(i) for i in items[:n]) + (f" … (+{len(items) - n})" if len(items) > n else "")


def broker_event_ids(stack):
    """{topic: Counter((eventID, key))} of every record in the broker: read through the Kafka
    protocol (`ostore-tools kafka dump`) from the mock, and from Tansu's SQLite storage
    (read-only), which also shows records a fetch would not."""
    if stack.args.broker != "tansu":
        out = collections.defaultdict(collections.Counter)
        path = os.path.join(stack.dir, "topics.jsonl")
        with open(path, "wb") as f:
            r = subprocess.run([stack.tools, "kafka", "dump", "--bootstrap-servers", stack.kafka],
                               stdout=f, stderr=subprocess.PIPE, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"kafka dump: {r.stderr.decode(errors='replace').strip()[-500:]}")
        with open(path, errors="replace") as f:
            for line in f:
                rec = json.loads(line)
                try:
                    event_id = json.loads(rec["value"]).get("eventID")
                except (ValueError, TypeError, AttributeError):
                    event_id = None
                out[rec["topic"]][(event_id, rec["key"])] += 1
        return out
    path = os.path.join(stack.broker_dir, "tansu.db")
    if not os.path.exists(path):
        raise RuntimeError(f"no {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        out = collections.defaultdict(collections.Counter)
        q = ("select t.name, r.k, r.v from record r join topition tp on r.topition = tp.id"
             " join topic t on tp.topic = t.id")
        for topic, k, v in db.execute(q):
            try:
                event_id = json.loads(v).get("eventID")
            except (ValueError, TypeError, AttributeError):
                event_id = None
            key = k.decode(errors="replace") if isinstance(k, (bytes, bytearray)) else k
            out[topic][(event_id, key)] += 1
        return out
    finally:
        db.close()


def check_all(stack, rec, users, initial_stock):
    c = Checks()
    sagas = stack.rows("select saga_id::text as id, order_id, user_id, state, step_name, last_error, last_error_class,"
                       " answer->>'status' as answer_status, cancel_requested from sagas")
    orders = stack.rows("select order_id, user_id, status, shipment_id, saga_id::text as saga, total_amount::text as total"
                        " from orders")
    items = stack.rows("select order_id, product_id, quantity from order_items")
    by_saga = {s["id"]: s for s in sagas}
    order_by_id = {o["order_id"]: o for o in orders}
    stuck = {s["id"] for s in sagas if s["state"] == "stuck"}
    stuck_orders = {s["order_id"] for s in sagas if s["state"] == "stuck"}

    # 1. sagas terminal or stuck with a reason
    states = collections.Counter(s["state"] for s in sagas)
    open_ = [s["id"] for s in sagas if s["state"] in ("running", "compensating")]
    stuck_no_reason = [s["id"] for s in sagas if s["state"] == "stuck" and not s["last_error"]]
    reasons = collections.Counter(f"{s['step_name']}/{s['last_error_class']}" for s in sagas if s["state"] == "stuck")
    fig = f"{len(sagas)} sagas: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
    if reasons:
        fig += "\nstuck by step/errorClass: " + ", ".join(f"{k} {v}" for k, v in reasons.items())
    if open_:
        fig += f"\nstill open: {sample(open_)}"
    if stuck_no_reason:
        fig += f"\nstuck without a reason: {sample(stuck_no_reason)}"
    c.add("1 sagas terminal or stuck with a reason", not open_ and not stuck_no_reason, fig)

    # 2. no double reservation, no double shipment
    reservations = http("GET", stack.catalog + "/sim/reservations")[2]
    shipments = http("GET", stack.shipments + "/sim/shipments")[2]
    res_ids = collections.Counter(r["reservationID"] for r in reservations)
    dup_res = [k for k, v in res_ids.items() if v > 1]
    unknown_res = [r["reservationID"] for r in reservations if r["reservationID"] not in by_saga]
    multi_key_res = [r["reservationID"] for r in reservations if len(r["idempotencyKeys"]) > 1]
    reserve_calls = sum(sum(r["calls"].values()) for r in reservations)
    ship_per_order = collections.Counter(s["orderID"] for s in shipments)
    dup_ship = [k for k, v in ship_per_order.items() if v > 1]
    unknown_ship = [s["shipmentID"] for s in shipments if s["orderID"] not in order_by_id]
    ship_calls = sum(sum(s["calls"].values()) for s in shipments)
    keys_rows = stack.scalar("select count(*) from idempotency_keys")
    sagas_per_key = stack.rows("select user_id, key, count(*) n from idempotency_keys group by 1, 2 having count(*) > 1")
    mismatched_ship = [o["order_id"] for o in orders if o["shipment_id"] and
                       not any(s["shipmentID"] == o["shipment_id"] and s["orderID"] == o["order_id"] for s in shipments)]
    ok = not (dup_res or unknown_res or multi_key_res or dup_ship or unknown_ship or sagas_per_key or mismatched_ship) \
        and keys_rows == len(sagas)
    fig = (f"{len(reservations)} reservations ({reserve_calls} reserve requests), none twice: {not dup_res and not multi_key_res}; "
           f"{len(shipments)} shipments ({ship_calls} create requests), at most one per order: {not dup_ship}\n"
           f"{keys_rows} Idempotency-Keys for {len(sagas)} sagas")
    for label, lst in (("reservation ids twice", dup_res), ("reservations of no saga", unknown_res),
                       ("reservations under several keys", multi_key_res), ("orders with 2+ shipments", dup_ship),
                       ("shipments of no order", unknown_ship), ("orders whose shipmentID the shipper lacks", mismatched_ship)):
        if lst:
            fig += f"\n{label}: {sample(lst)}"
    c.add("2 no double reservation or shipment", ok, fig)

    # 3. reservations and live shipments match confirmed orders; stock adds up
    live_statuses = {"confirmed", "shipped", "delivered"}
    active = {r["reservationID"] for r in reservations if r["status"] == "active"}
    expected_active = {o["saga"] for o in orders if o["status"] in live_statuses}
    extra_active = sorted(active - expected_active - stuck)
    missing_active = sorted(expected_active - active)
    live_ship_orders = {s["orderID"] for s in shipments if s["status"] != "cancelled"}
    confirmed_orders = {o["order_id"] for o in orders if o["status"] in live_statuses}
    orphan_ship = sorted(live_ship_orders - confirmed_orders - stuck_orders)
    missing_ship = sorted(confirmed_orders - live_ship_orders)
    stock_bad = []
    active_qty, active_qty_nonstuck, live_qty_nonstuck = (collections.Counter() for _ in range(3))
    for r in reservations:
        if r["status"] == "active":
            for it in r["items"]:
                active_qty[it["productID"]] += it["quantity"]
                if r["reservationID"] not in stuck:
                    active_qty_nonstuck[it["productID"]] += it["quantity"]
    for it in items:
        o = order_by_id.get(it["order_id"])
        if o and o["status"] in live_statuses and o["saga"] not in stuck:
            live_qty_nonstuck[it["product_id"]] += it["quantity"]
    for pid, initial in initial_stock.items():
        p = http("GET", f"{stack.catalog}/sim/products/{pid}")[2]
        if p["stock"] + p["reserved"] != initial or p["reserved"] != active_qty[pid] \
                or active_qty_nonstuck[pid] != live_qty_nonstuck[pid]:
            stock_bad.append(f"product {pid}: initial {initial}, available {p['stock']}, reserved {p['reserved']},"
                             f" in active reservations {active_qty[pid]} ({active_qty_nonstuck[pid]} not stuck),"
                             f" in live orders {live_qty_nonstuck[pid]} (not stuck)")
    ok = not (extra_active or missing_active or orphan_ship or missing_ship or stock_bad)
    fig = (f"{len(active)} active reservations for {len(expected_active)} confirmed/shipped/delivered orders"
           f" ({len(active & stuck)} more held by stuck sagas); {len(live_ship_orders)} live shipments;"
           f" stock adds up for {len(initial_stock) - len(stock_bad)}/{len(initial_stock)} products")
    for label, lst in (("active reservations without a live order", extra_active),
                       ("live orders without an active reservation", missing_active),
                       ("live shipments of orders not confirmed", orphan_ship),
                       ("live orders without a live shipment", missing_ship)):
        if lst:
            fig += f"\n{label}: {sample(lst)}"
    for line in stock_bad[:5]:
        fig += "\n" + line
    c.add("3 reservations match confirmed orders", ok, fig)

    # 4. outbox: every row marked published, and found in its topic (read from the broker's storage)
    ob = stack.rows("select topic, count(*) as n, count(*) filter (where published_at is null) as unpublished"
                    " from outbox group by topic order by topic")
    unpublished = sum(r["unpublished"] for r in ob)
    fig = f"{sum(r['n'] for r in ob)} rows, {unpublished} unpublished: " + ", ".join(f"{r['topic']} {r['n']}" for r in ob)
    ok = unpublished == 0 and bool(ob)
    try:
        in_kafka = broker_event_ids(stack)
    except Exception as e:  # noqa: BLE001 -- another broker, or a storage format this cannot read
        in_kafka = None
        fig += f"\ntopic contents not verified: {e}"
    if in_kafka is not None:
        rows = stack.rows("select topic, event_id::text as id, message_key, published_at is not null as published"
                          " from outbox")
        lost = [f"{r['topic']}:{r['id']}" for r in rows
                if r["published"] and (r["id"], r["message_key"]) not in in_kafka.get(r["topic"], {})]
        copies = sum(sum(in_kafka.get(t, {}).values()) for t in {r["topic"] for r in rows})
        found = sum(1 for r in rows if (r["id"], r["message_key"]) in in_kafka.get(r["topic"], {}))
        fig += (f"\nin the topics: {found}/{len(rows)} rows found (by eventID and key),"
                f" {copies} records ({copies - found} duplicate copies, allowed: at-least-once)")
        if lost:
            fig += f"\nrows marked published but not in their topic: {sample(lost)}"
        ok = ok and not lost
    c.add("4 every outbox row published", ok, fig)
    stack.kafka_ids = in_kafka

    # 5. tracking events applied once
    events = http("GET", stack.shipments + "/sim/events")[2]
    inbox = stack.rows("select event_id::text as id, order_id, tracking_status, outcome from tracking_inbox")
    inbox_ids = collections.Counter(r["id"] for r in inbox)
    ev_ids = {e["eventID"] for e in events}
    # An event of an order whose saga is stuck (check 1 reports it, with its reason) waits in
    # tracking_retries until its window ends and is then dead-lettered: accounted for, not lost.
    parked_rows = stack.rows("select event_id::text as id, order_id from tracking_retries")
    parked_stuck = {r["id"] for r in parked_rows if r["order_id"] in stuck_orders}
    parked = len(parked_rows) - len(parked_stuck)
    missing_ev = sorted(ev_ids - set(inbox_ids) - parked_stuck)
    foreign = sorted(set(inbox_ids) - ev_ids)
    dead = stack.scalar("select count(*) from dead_letters")
    # Notifications: one per order and status the tracking consumer changed (duplicates would mean an
    # event was applied twice).
    notif_dups = stack.rows(
        "select message_key, payload->'data'->>'status' as status, count(*) n from outbox"
        " where topic = 'users.notifications' and event_type = 'OrderStatusChanged'"
        " group by 1, 2 having count(*) > 1")
    latest = {}
    for s in shipments:
        latest[s["orderID"]] = s["status"]
    want = {"created": "confirmed", "picked_up": "shipped", "in_transit": "shipped", "out_for_delivery": "shipped",
            "delivered": "delivered", "cancelled": "cancelled"}
    disagree = []
    for oid, st in latest.items():
        o = order_by_id.get(oid)
        if o is None or oid in stuck_orders:
            continue
        if want.get(st) != o["status"]:
            disagree.append(f"order {oid} {o['status']} / shipment {st}")
    notified = {(int(r["message_key"]), r["status"]) for r in stack.rows(
        "select distinct message_key, payload->'data'->>'status' as status from outbox"
        " where topic = 'users.notifications' and event_type = 'OrderStatusChanged'")}
    # The current status must have been notified (an order may skip `shipped` when the shipper's
    # picked_up/in_transit events never arrived: then there is no shipped notification to expect).
    missing_notif = [f"{o['order_id']}:{o['status']}" for o in orders if o["status"] in ("shipped", "delivered")
                     and (o["order_id"], o["status"]) not in notified]
    outcomes = collections.Counter(r["outcome"] for r in inbox)
    # Dead letters: exactly the poison records the shipper published, each as malformed.
    poisons = (http("GET", stack.shipments + "/sim/poison")[2] or {}).get("published", 0)
    malformed = stack.scalar("select count(*) from dead_letters where reason like 'malformed%'")
    bad_dead = dead != poisons or malformed != poisons
    ok = not (missing_ev or foreign or parked or bad_dead or notif_dups or disagree or missing_notif)
    fig = (f"{len(events)} events published by the shipper, {len(inbox)} in the inbox ("
           + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) + f"); parked {parked}"
           + (f" (+ {len(parked_stuck)} for orders of stuck sagas, waiting out their window)" if parked_stuck else "")
           + ","
           f" dead letters {dead} ({malformed} malformed) for {poisons} poison records sent;"
           f" duplicate notifications {len(notif_dups)}; order/shipment disagreements {len(disagree)}")
    if getattr(stack, "kafka_ids", None) is not None and missing_ev:
        in_topic = {eid for eid, _ in stack.kafka_ids.get("shipments.tracking-events", {})}
        fig += (f"\nof the {len(missing_ev)} events never applied, {len(set(missing_ev) - in_topic)} never reached"
                " the topic (lost between the simulator and the broker)")
    for label, lst in (("events never applied", missing_ev), ("inbox rows the shipper never sent", foreign),
                       ("duplicate notifications", [f"{d['message_key']}:{d['status']}x{d['n']}" for d in notif_dups]),
                       ("disagreements", disagree), ("missing notifications", missing_notif)):
        if lst:
            fig += f"\n{label}: {sample(lst)}"
    c.add("5 every tracking event applied once", ok, fig)

    # 7. orders agree with their sagas
    allowed = {"completed": {"confirmed", "shipped", "delivered"}, "failed": {"cancelled", "rejected", None},
               "compensated": {"cancelled"}, "stuck": {"cancelled", "confirmed", "shipped", "delivered", "pending"}}
    mismatch = []
    for sg in sagas:
        o = order_by_id.get(sg["order_id"])
        st = o["status"] if o else None
        if st not in allowed.get(sg["state"], set()):
            mismatch.append(f"order {sg['order_id']} {st} / saga {sg['state']}")
        elif o and o["saga"] != sg["id"]:
            mismatch.append(f"order {sg['order_id']} belongs to saga {o['saga']}, not {sg['id']}")
    sagaless = [o["order_id"] for o in orders if o["saga"] not in by_saga]
    no_total = [o["order_id"] for o in orders if o["status"] in live_statuses and (o["total"] is None or not
                                                                                   o["shipment_id"])]
    # No event may contradict the order: no OrderConfirmed after its OrderCancelled.
    contradicted = [r["message_key"] for r in stack.rows(
        "select c.message_key from outbox c join outbox k on k.message_key = c.message_key and k.topic = c.topic"
        " where c.topic = 'orders.events' and c.event_type = 'OrderConfirmed' and k.event_type = 'OrderCancelled'"
        " and c.id > k.id group by c.message_key")]
    fig = (f"{len(orders)} orders, {len(sagas)} sagas; mismatches {len(mismatch)}; orders without a saga"
           f" {len(sagaless)}; live orders without total or shipmentID {len(no_total)};"
           f" OrderConfirmed after OrderCancelled {len(contradicted)}")
    for label, lst in (("mismatches", mismatch), ("orders without a saga", sagaless), ("incomplete", no_total),
                       ("OrderConfirmed after OrderCancelled", contradicted)):
        if lst:
            fig += f"\n{label}: {sample(lst)}"
    c.add("7 orders agree with their sagas", not (mismatch or sagaless or no_total or contradicted), fig)

    # 6. what clients were told
    with rec.lock:
        keys = dict(rec.keys)
        cancels = dict(rec.cancels)
    unresolved = [k for k, e in keys.items() if e["final"] is None]
    unexpected = [f"{k[1]}: {e['final']} {e.get('detail')}" for k, e in keys.items()
                  if e["final"] and e["final"].startswith("unexpected")]
    two_ids = [k[1] for k, e in keys.items() if len({oid for _, oid in e["answers"] if oid is not None}) > 1]
    returned = {}
    for (uid, key), e in keys.items():
        for _, oid in e["answers"]:
            if oid is not None:
                returned[oid] = uid
    unreadable = []
    for oid, uid in returned.items():
        try:
            st, _, body = http("GET", f"{stack.apis[oid % len(stack.apis)]}/orders/{oid}",
                               headers={"authorization": f"Bearer {users[uid]}"})
        except ConnError as e:
            st, body = f"no answer ({e})", None
        if st != 200:
            unreadable.append(f"{oid}: {st}")
        elif order_by_id.get(oid, {}).get("status") != body.get("status"):
            unreadable.append(f"{oid}: API {body.get('status')} vs DB {order_by_id.get(oid, {}).get('status')}")
    # A stock refusal answered 409 leaves no order behind.
    stock_keys = [k for k, e in keys.items() if e["final"] == "409 stock"]
    placeholder_left = stack.rows(
        "select s.order_id from sagas s join orders o using (order_id)"
        " where (s.answer->>'status') = '409' and s.answer->'problem' ? 'unavailable' and not s.answered_pending")
    # A customer cancellation answered 200 ends cancelled.
    cancel_lost = [f"{oid}: {order_by_id.get(oid, {}).get('status')}" for oid, r in cancels.items()
                   if r.startswith("cancelled") and order_by_id.get(oid, {}).get("status") != "cancelled"]
    cancel_unresolved = [oid for oid, r in cancels.items() if r == "unresolved"]
    ok = not (unresolved or unexpected or two_ids or unreadable or placeholder_left or cancel_lost or cancel_unresolved)
    finals = collections.Counter(e["final"] for e in keys.values())
    fig = (f"{len(keys)} keys: " + ", ".join(f"{k} {v}" for k, v in sorted(finals.items(), key=lambda x: str(x[0])))
           + f"\n{len(returned)} orderIDs returned, {len(returned) - len(unreadable)} readable with the same status;"
           f" {len(two_ids)} keys with 2+ orderIDs; {len(stock_keys)} stock refusals, {len(placeholder_left)} left an order"
           f"\n{len(cancels)} customer cancels: " + ", ".join(
               f"{k} {v}" for k, v in sorted(collections.Counter(r.split(' (')[0] for r in cancels.values()).items()))
           + f"; answered cancelled but not cancelled: {len(cancel_lost)}")
    for label, lst in (("unresolved keys", [k[1] for k in unresolved]), ("unexpected answers", unexpected),
                       ("keys with 2+ orderIDs", two_ids), ("unreadable orderIDs", unreadable),
                       ("orders left by 409 stock", [r["order_id"] for r in placeholder_left]),
                       ("cancels answered 200 but order not cancelled", cancel_lost),
                       ("cancels unresolved", cancel_unresolved)):
        if lst:
            fig += f"\n{label}: {sample(lst)}"
    c.add("6 client answers hold", ok, fig)
    return c, sagas, orders
