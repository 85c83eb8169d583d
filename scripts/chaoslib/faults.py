"""Faults and their schedule."""

import collections
import threading
import time

from .common import CONSUMER_KILL_SPACING, ConnError, http, log

# --------------------------------------------------------------------------------------------
# Faults and the schedule


class Chaos:
    def __init__(self, stack, rec, rng, long, kill_consumers=False):
        self.kill_consumers = kill_consumers
        self.stack = stack
        self.rec = rec
        self.rng = rng
        self.long = long
        self.events = []  # (t, what)
        self.kills = 0
        self.recoveries = []  # seconds from restart to /livez
        self.broker_restarts = 0
        self.pg_restarts = collections.Counter()
        self.faults_set = 0
        self.consumer_kills = 0
        self.last_consumer_kill = -1e9
        self.recovering = False
        self.broker_recoveries = 0
        self.t0 = time.monotonic()
        self.samples = []  # (t, pending outbox, oldest age, running sagas)
        self.poisons = 0  # poison records the shipper published (POST /sim/poison)
        self.cancel_bursts = 0
        self.sampling = threading.Event()

    def note(self, what):
        t = time.monotonic() - self.t0
        self.events.append((round(t, 1), what))
        log(f"  t={t:6.1f}s  {what}")
        self.recover_broker()

    def recover_broker(self):
        """Tansu 0.6.0 sometimes panics in its storage task (an idempotent producer's epoch it does
        not know; see docs/reliability.md) and then serves nobody. What an operator would do: restart
        the broker on its data, then its clients (so no producer keeps the epoch it choked on)."""
        if self.recovering or not self.stack.broker_panicked():
            return False
        self.recovering = True
        try:
            self.broker_recoveries += 1
            self.note("the broker (Tansu) panicked: restarting it on its data, then every service process")
            self.stack.kill_broker()
            self.stack.broker("start", keep=True)
            for i in range(len(self.stack.apis)):
                self.stack.kill_service(i)
                self.stack.kill_consumer(i)
                self.stack.start_service(i)
                self.stack.start_consumer(i)
            for i in range(len(self.stack.apis)):
                self.stack.wait_service(i)
        finally:
            self.recovering = False
        return True

    # -- the injections

    def kill_restart(self, down=None, which=None):
        """SIGKILLs one instance (random), or all of them with which="all", and restarts them."""
        n = len(self.stack.apis)
        down = self.rng.uniform(0.0, 1.5) if down is None else down
        targets = list(range(n)) if which == "all" else [self.rng.randrange(n) if which is None else which]
        for i in targets:
            self.stack.kill_service(i)
            self.kills += 1
        label = "every instance" if len(targets) == n and n > 1 else f"instance {targets[0]}"
        self.note(f"SIGKILL {label} (kills so far: {self.kills}); restart in {down:.1f}s")
        time.sleep(down)
        for i in targets:
            self.stack.start_service(i)
        for i in targets:
            self.recoveries.append(self.stack.wait_service(i))

    def kill_consumer(self):
        """SIGKILLs one tracking consumer and restarts it, at most once a minute (more than the
        consumers' 45 s session timeout, after which the coordinator hands the dead member's
        partitions on). Tansu's coordinator never does (docs/reliability.md)."""
        if not self.kill_consumers or time.monotonic() - self.last_consumer_kill < CONSUMER_KILL_SPACING:
            return False
        i = self.rng.randrange(len(self.stack.apis))
        self.stack.kill_consumer(i)
        self.consumer_kills += 1
        self.last_consumer_kill = time.monotonic()
        self.note(f"SIGKILL tracking consumer {i} (consumer kills so far: {self.consumer_kills}); restart in 1s")
        time.sleep(1)
        self.stack.start_consumer(i)
        return True

    def broker_outage(self, seconds):
        """Takes the broker away (Tansu: SIGKILL, a crash; mock: every connection closed and new
        ones refused) and brings it back with its records."""
        how = "SIGKILL" if self.stack.process_broker() else "down (connections closed, refused)"
        self.note(f"broker {how}, for {seconds:.0f}s")
        self.stack.broker_down()
        time.sleep(seconds)
        self.stack.broker_up()
        self.broker_restarts += 1
        self.note("broker back (same records)")

    def pg_restart(self, mode, down):
        self.note(f"PostgreSQL stop -m {mode}, down {down:.0f}s")
        self.stack.pg_ctl("stop", mode=mode)
        time.sleep(down)
        self.stack.pg_ctl("start")
        self.pg_restarts[mode] += 1
        self.note("PostgreSQL back")

    def faults(self, sim, spec, label):
        url = (self.stack.catalog if sim == "catalog" else self.stack.shipments) + "/sim/faults"
        st, _, ans = http("PUT", url, spec, timeout=10)
        if st != 200:
            raise RuntimeError(f"PUT {url} {spec} -> {st} {ans}")
        self.faults_set += 1
        self.note(f"{sim} faults: {label}")

    def clear(self, sim=None):
        for s in ([sim] if sim else ["catalog", "shipments"]):
            url = (self.stack.catalog if s == "catalog" else self.stack.shipments) + "/sim/faults"
            http("DELETE", url, timeout=10)
        self.note(f"faults cleared ({sim or 'both'})")

    def poison(self):
        """A 780 KB record that is not a TrackingEvent, on the tracking topic: the consumer must
        dead-letter it and the relay must publish its (truncated) DLQ copy and everything else."""
        try:
            st, _, ans = http("POST", self.stack.shipments + "/sim/poison", {"orderID": 0, "bytes": 780_000}, timeout=40)
        except ConnError as e:
            self.note(f"poison record not sent: {e}")
            return
        if st == 200:
            self.poisons += 1
            self.note(f"poison record (780 KB, not a TrackingEvent) on the tracking topic (so far: {self.poisons})")
        else:
            self.note(f"poison record not published: {st} {ans}")

    def cancel_during_shipment(self, seconds=8.0):
        """Shipment creation slowed to 2.5 s while clients cancel half their orders at once: the
        cancel lands while create_shipment is in flight (no event may contradict the order)."""
        self.cancel_bursts += 1
        self.faults("shipments", {"latencyMs": 2500, "endpoint": "create"}, "shipment creation takes 2.5 s; clients cancel half their orders at once")
        self.rec.cancel_burst = 0.5
        time.sleep(seconds)
        self.rec.cancel_burst = 0.0
        self.clear("shipments")

    def fault_window(self, sim, spec, label, seconds):
        self.faults(sim, spec, label)
        time.sleep(seconds)
        self.clear(sim)

    # -- the downstream fault menu (each bounded)

    def fault_menu(self):
        r = self.rng
        return [
            ("catalog", {"latencyMs": 4000, "endpoint": "reserve"}, "reserve latency 4 s (answers turn 202)", 6),
            ("catalog", {"errorRate": 0.5}, "half the catalog calls 503", 6),
            ("shipments", {"errorRate": 0.5}, "half the shipment calls 503", 6),
            ("shipments", {"hang": True, "endpoint": "create"}, "shipment creation hangs", 7),
            ("catalog", {"hang": True, "endpoint": "reserve"}, "reservation hangs", 6),
            ("catalog", [{"failNext": 30, "endpoint": "release"}, {"latencyMs": 300, "endpoint": "reserve"}],
             "next 30 releases 503, reserve +300 ms", 5),
            ("shipments", {"failNext": r.randint(2, 4), "failStatus": 422, "endpoint": "create"},
             "the shipper refuses the next few (422)", 4),
            ("catalog", {"malformed": True, "endpoint": "reserve"}, "reservation answers break the contract", 2),
            ("shipments", {"failNext": 20, "failStatus": 429, "retryAfterSeconds": 1}, "next 20 shipment calls 429", 4),
        ]

    def sampler(self):
        """Samples the outbox backlog once a second (tolerates the database being down)."""
        while not self.sampling.is_set():
            try:
                s = self.stack.rows(
                    "select (select count(*) from outbox where id > outbox_published_through()) as pending,"
                    " (select extract(epoch from now() - min(created_at)) from outbox where id > outbox_published_through()) as age,"
                    " (select count(*) from sagas where state in ('running','compensating')) as running")[0]
                self.samples.append((time.monotonic() - self.t0, s["pending"], s["age"] or 0, s["running"]))
            except Exception:  # noqa: BLE001 -- the database may be restarting
                pass
            self.sampling.wait(1.0)

    # -- the schedules

    def kill_during_startup(self):
        """SIGKILL an instance, restart it, and kill it again while it starts (migrations, claims)."""
        i = self.rng.randrange(len(self.stack.apis))
        self.stack.kill_service(i)
        self.stack.start_service(i)
        time.sleep(self.rng.uniform(0.05, 0.4))
        self.kills += 1
        self.note(f"SIGKILL instance {i}, restart, SIGKILL again while it starts")
        self.kill_restart(down=0.2, which=i)

    def run_short(self):
        r = self.rng
        self.note("warm-up under load")
        time.sleep(5)
        self.kill_consumer()
        self.poison()
        self.cancel_during_shipment()
        for _ in range(3):
            time.sleep(r.uniform(2, 4))
            self.kill_restart()
        time.sleep(2)
        self.kill_restart(down=1.0, which="all")
        time.sleep(3)
        self.broker_outage(8)
        time.sleep(3)
        self.pg_restart("fast", 2)
        time.sleep(3)
        self.pg_restart("immediate", 2)
        time.sleep(3)
        for sim, spec, label, secs in self.fault_menu():
            self.fault_window(sim, spec, label, secs * 0.6)
            time.sleep(0.5)
        # Everything at once: a hang and 503s downstream while every instance is killed.
        self.faults("shipments", {"errorRate": 0.3}, "30% shipment 503s")
        self.faults("catalog", [{"hang": True, "endpoint": "reserve"}], "reservation hangs")
        time.sleep(2)
        self.kill_restart(which="all")
        time.sleep(2)
        self.clear()
        time.sleep(3)

    def run_long(self, minutes):
        r = self.rng
        self.note("warm-up under load")
        time.sleep(10)
        end = time.monotonic() + minutes * 60
        menu = self.fault_menu()
        kinds = (["kill"] * 4 + ["kill_all"] * 2 + ["kill_startup"] + ["kill_during_fault"] * 2 + ["broker"] * 2
                 + ["pg_fast", "pg_immediate"] + ["fault"] * 4 + ["kill_consumer"] * 2 + ["poison", "cancel_burst"])
        rounds = 0
        while time.monotonic() < end:
            rounds += 1
            kind = r.choice(kinds)
            if kind == "kill":
                self.kill_restart(down=r.choice([0.0, 0.5, 2.0, 8.0]))
            elif kind == "kill_all":
                self.kill_restart(down=r.choice([0.0, 1.0, 4.0]), which="all")
            elif kind == "kill_startup":
                self.kill_during_startup()
            elif kind == "kill_during_fault":
                sim, spec, label, secs = r.choice(menu)
                self.faults(sim, spec, label)
                time.sleep(r.uniform(0.5, secs))
                self.kill_restart(which=r.choice([None, "all"]))
                time.sleep(r.uniform(0.5, 2))
                self.clear()
            elif kind == "kill_consumer":
                if not self.kill_consumer():
                    self.kill_restart()
            elif kind == "poison":
                self.poison()
            elif kind == "cancel_burst":
                self.cancel_during_shipment(r.uniform(5, 12))
            elif kind == "broker":
                # Tansu: below the relay's message.timeout.ms (30 s), beyond which librdkafka bumps
                # its epoch and Tansu panics (docs/reliability.md). The mock takes longer outages
                # (the shipper's message timeout is 10 minutes).
                self.broker_outage(r.uniform(5, 20) if self.stack.args.broker == "tansu" else r.uniform(5, 45))
            elif kind == "pg_fast":
                self.pg_restart("fast", r.uniform(1, 8))
            elif kind == "pg_immediate":
                self.pg_restart("immediate", r.uniform(1, 8))
            else:
                sim, spec, label, secs = r.choice(menu)
                self.fault_window(sim, spec, label, secs)
            time.sleep(r.uniform(2, 6))
        # Make sure every kind ran at least once, whatever the dice said.
        if self.broker_restarts == 0:
            self.broker_outage(10)
        if self.poisons == 0:
            self.poison()
        if self.cancel_bursts == 0:
            self.cancel_during_shipment()
        if self.kill_consumers and self.consumer_kills == 0:
            self.last_consumer_kill = -1e9
            self.kill_consumer()
        for mode in ("fast", "immediate"):
            if self.pg_restarts[mode] == 0:
                self.pg_restart(mode, 3)
        self.note(f"{rounds} rounds done")
