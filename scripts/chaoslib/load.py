"""Load: clients placing and cancelling orders, and what they were told."""

import collections
import random
import threading
import time

from .common import ConnError, PASSWORD, PLENTIFUL, SCARCE, UNKNOWN_PRODUCT, http

# --------------------------------------------------------------------------------------------
# Load: clients placing and cancelling orders


class Records:
    """What the clients saw, shared by the load threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.keys = {}  # (user_id, key) -> {"body", "answers": [(status, orderID)], "final", "user"}
        self.cancels = {}  # orderID -> final cancel answer ("cancelled" | "not-cancellable:<status>" | "unresolved")
        self.counters = collections.Counter()
        # While set (a share, 0-1), clients cancel that share of their orders at once: the
        # cancel-during-shipment load (shipment creation slowed meanwhile).
        self.cancel_burst = 0.0

    def count(self, name, n=1):
        with self.lock:
            self.counters[name] += n


class Client:
    """One customer: logs in, places orders with an Idempotency-Key, retries the same key after a
    connection error, a 5xx, a 429 or a 409 request-in-flight (what a careful client does)."""

    def __init__(self, stack, rec, email, user_id, instance):
        self.stack = stack
        self.rec = rec
        self.email = email
        self.user_id = user_id
        self.token = None
        self.instance = instance

    def url(self, path):
        return self.stack.apis[self.instance] + path

    def failover(self):
        """After a connection error, the next request goes to the next instance (a load balancer)."""
        self.instance = (self.instance + 1) % len(self.stack.apis)

    def login(self, deadline):
        while time.monotonic() < deadline:
            try:
                st, _, body = http("POST", self.url("/auth/login"),
                                   {"email": self.email, "password": PASSWORD}, timeout=10)
                if st == 200:
                    self.token = body["token"]
                    return True
                self.rec.count(f"login answered {st}")
            except ConnError:
                self.rec.count("login connection errors")
                self.failover()
            time.sleep(0.5)
        return False

    def auth(self):
        return {"authorization": f"Bearer {self.token}"}

    def place(self, key, body, deadline):
        """Places one order; returns the final outcome dict or None when unresolved at deadline."""
        rk = (self.user_id, key)
        with self.rec.lock:
            entry = self.rec.keys.setdefault(rk, {"body": body, "answers": [], "final": None, "user": self.user_id})
        attempt = 0
        while True:
            if attempt > 0:
                self.rec.count("same-key retries")
                if time.monotonic() > deadline:
                    return None
            attempt += 1
            try:
                headers = dict(self.auth(), **{"Idempotency-Key": key})
                st, rh, ans = http("POST", self.url("/orders"), body, headers, timeout=30)
            except ConnError:
                self.rec.count("POST /orders connection errors")
                self.failover()
                time.sleep(0.3 + random.random() * 0.7)
                continue
            ans = ans if isinstance(ans, dict) else {}
            if st == 401:
                self.rec.count("POST /orders 401 (login again)")
                self.login(deadline)
                continue
            if st == 429 or st >= 500:
                self.rec.count(f"POST /orders {st}")
                time.sleep(min(5.0, float(rh.get("Retry-After") or 1)) if st == 429 else 0.5)
                continue
            if st == 409 and ans.get("type", "").endswith("request-in-flight"):
                self.rec.count("POST /orders 409 in flight")
                time.sleep(1.0)
                continue
            oid = ans.get("orderID")
            if st == 201:
                outcome = "201 confirmed"
            elif st == 202:
                outcome = "202 pending"
            elif st == 409 and oid is not None:
                outcome = "409 cancelled"
            elif st == 409 and "unavailable" in ans:
                outcome = "409 stock"
            else:
                outcome = f"unexpected {st}"
            with self.rec.lock:
                entry["answers"].append((st, oid))
                entry["final"] = outcome
                self.rec.counters[f"answer {outcome}"] += 1
                if outcome.startswith("unexpected"):
                    entry["detail"] = ans
            return {"outcome": outcome, "orderID": oid}

    def cancel(self, order_id, deadline):
        while time.monotonic() < deadline:
            try:
                st, _, ans = http("POST", self.url(f"/orders/{order_id}/cancel"), None, self.auth(), timeout=30)
            except ConnError:
                self.rec.count("cancel connection errors")
                self.failover()
                time.sleep(0.5)
                continue
            ans = ans if isinstance(ans, dict) else {}
            if st == 200:
                result = f"cancelled ({ans.get('status')})"
            elif st == 202:
                # A confirmed order whose shipper has not answered the cancellation yet.
                result = f"accepted ({ans.get('status')})"
            elif st == 409:
                result = f"too late ({ans.get('orderStatus')})"
            elif st >= 500 or st in (401, 429):
                self.rec.count(f"cancel {st}")
                if st == 401:
                    self.login(deadline)
                time.sleep(0.5)
                continue
            else:
                result = f"unexpected {st}"
            with self.rec.lock:
                self.rec.cancels[order_id] = result
                self.rec.counters[f"cancel {result.split(' ')[0]}"] += 1
            return result
        with self.rec.lock:
            self.rec.cancels.setdefault(order_id, "unresolved")
        return None


def order_body(rng):
    """A few lines: mostly plentiful products, sometimes a scarce one, rarely an unknown one."""
    products = rng.sample(list(PLENTIFUL), rng.choice([1, 1, 2, 2, 3]))
    r = rng.random()
    if r < 0.15:
        products[0] = rng.choice(list(SCARCE))
    elif r < 0.17:
        products[0] = UNKNOWN_PRODUCT
    return {"orderItems": [{"productID": p, "quantity": rng.randint(1, 3)} for p in products]}


def load_thread(client, tid, seed, rec, stop, hard_deadline, cancel_share, pause):
    rng = random.Random(f"{seed}-{tid}")
    if not client.login(hard_deadline):
        rec.count("clients that could not log in")
        return
    n = 0
    pending_cancels = []  # (due, orderID)
    while not stop.is_set():
        n += 1
        key = f"chaos-{seed}-{tid}-{n}"
        res = client.place(key, order_body(rng), hard_deadline)
        if res and res["orderID"] is not None and res["outcome"] in ("201 confirmed", "202 pending"):
            burst = rec.cancel_burst
            if burst and rng.random() < burst:
                # The cancel-during-shipment load: at once, while the shipment is being created.
                pending_cancels.append((time.monotonic(), res["orderID"]))
                rec.count("cancels during shipment creation")
            elif rng.random() < cancel_share:
                # Most cancels come at once; some a little later, racing the shipper's pick-up.
                delay = 0 if rng.random() < 0.7 else rng.uniform(0.5, 6.0)
                pending_cancels.append((time.monotonic() + delay, res["orderID"]))
        now = time.monotonic()
        for item in [c for c in pending_cancels if c[0] <= now]:
            pending_cancels.remove(item)
            client.cancel(item[1], hard_deadline)
        time.sleep(pause * rng.uniform(0.5, 1.5))
    for _, oid in pending_cancels:
        client.cancel(oid, hard_deadline)
