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


def dump_topics(stack):
    """Every record of the broker as JSON lines (`topic`, `key`, `value`, ...) in a file: read
    through the Kafka protocol (`ostore-tools kafka dump`) from Apache Kafka and the mock, and
    from Tansu's SQLite storage (read-only), which also shows records a fetch would not."""
    path = os.path.join(stack.dir, "topics.jsonl")
    if stack.args.broker != "tansu":
        with open(path, "wb") as f:
            r = subprocess.run([stack.tools, "kafka", "dump", "--bootstrap-servers", stack.kafka],
                               stdout=f, stderr=subprocess.PIPE, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"kafka dump: {r.stderr.decode(errors='replace').strip()[-500:]}")
        return path
    db_path = os.path.join(stack.broker_dir, "tansu.db")
    if not os.path.exists(db_path):
        raise RuntimeError(f"no {db_path}")
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        q = ("select t.name, r.k, r.v from record r join topition tp on r.topition = tp.id"
             " join topic t on tp.topic = t.id")
        text = lambda b: b.decode(errors="replace") if isinstance(b, (bytes, bytearray)) else b
        with open(path, "w") as f:
            for topic, k, v in db.execute(q):
                f.write(json.dumps({"topic": topic, "key": text(k), "value": text(v)}) + "\n")
        return path
    finally:
        db.close()


def verify(stack, initial_stock, records):
    """`ostore-tools verify --json`: checks 1-5 and 7, the invariants the crash tests check too."""
    argv = [stack.tools, "verify", "--json", "--database-url", stack.db_url, "--catalog-url", stack.catalog,
            "--shipments-url", stack.shipments]
    for pid, qty in sorted(initial_stock.items()):
        argv += ["--initial-stock", f"{pid}={qty}"]
    if records:
        argv += ["--topic-records", records]
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"verify: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)["checks"]


def check_all(stack, rec, users, initial_stock):
    c = Checks()
    try:
        records, not_verified = dump_topics(stack), None
    except Exception as e:  # noqa: BLE001 -- another broker, or a storage format this cannot read
        records, not_verified = None, f"topic contents not verified: {e}"
    for check in verify(stack, initial_stock, records):
        figures = check["figures"]
        if check["id"] == 4 and not_verified:
            figures += "\n" + not_verified
        c.add(f"{check['id']} {check['name']}", check["ok"], figures)
    orders = stack.rows("select order_id, status from orders")
    order_by_id = {o["order_id"]: o for o in orders}

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
    return c, orders
