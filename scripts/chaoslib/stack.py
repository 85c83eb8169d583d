"""The private stack: PostgreSQL, the broker, the simulators and the service processes."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from .common import ConnError, JWT_SECRET, ROOT, free_port, http, log

# --------------------------------------------------------------------------------------------
# The stack


class Stack:
    """Every process the suite starts; `close` stops them all."""

    def __init__(self, args, workdir, binary, tools):
        self.args = args
        self.dir = workdir
        self.bin = binary
        self.tools = tools  # ostore-tools: kafka mock, kafka dump, verify
        self.as_root = os.geteuid() == 0
        self.pg_bin = os.environ.get("PG_BIN") or self._find_pg_bin()
        self.pg_port = free_port()
        self.broker_port = free_port()
        self.api_ports = [free_port() for _ in range(args.instances)]
        self.catalog_port = free_port()
        self.shipments_port = free_port()
        self.pg_data = os.path.join(workdir, "pgdata")
        self.pg_sock = os.path.join(workdir, "pgsock")
        self.broker_dir = os.path.join(workdir, "broker")
        self.db_url = f"postgres://postgres@127.0.0.1:{self.pg_port}/ostore?sslmode=disable"
        self.apis = [f"http://127.0.0.1:{port}" for port in self.api_ports]
        self.api = self.apis[0]
        self.catalog = f"http://127.0.0.1:{self.catalog_port}"
        self.shipments = f"http://127.0.0.1:{self.shipments_port}"
        self.kafka = f"127.0.0.1:{self.broker_port}"  # the mock's port is its own choice: see start_broker
        self.procs = {}  # name -> Popen
        self.pg_started = False
        self.broker_started = False
        self.service_starts = 0
        self.consumer_starts = 0

    # -- helpers

    @staticmethod
    def _find_pg_bin():
        cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
        if cands:
            return os.path.dirname(cands[-1])
        pg_ctl = shutil.which("pg_ctl")
        if pg_ctl:
            return os.path.dirname(pg_ctl)
        sys.exit("chaos: no PostgreSQL binaries found (set PG_BIN)")

    def _pg_cmd(self, *argv):
        cmd = [os.path.join(self.pg_bin, argv[0]), *argv[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return cmd

    def _log(self, name):
        return open(os.path.join(self.dir, f"{name}.log"), "ab")

    # -- PostgreSQL (ours alone)

    def start_pg(self):
        os.makedirs(self.pg_sock, exist_ok=True)
        os.makedirs(self.pg_data, exist_ok=True)
        if self.as_root:
            shutil.chown(self.pg_sock, "postgres", "postgres")
            shutil.chown(self.pg_data, "postgres", "postgres")
        with self._log("initdb") as out:
            subprocess.run(
                self._pg_cmd("initdb", "-D", self.pg_data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-instructions"),
                stdout=out, stderr=subprocess.STDOUT, check=True,
            )
        with open(os.path.join(self.pg_data, "postgresql.conf"), "a") as f:
            f.write(
                f"\nport = {self.pg_port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.pg_sock}'\nmax_connections = 100\n"
                "shared_buffers = 64MB\nlogging_collector = off\n"
            )
        self.pg_ctl("start")
        self.pg_started = True

    def pg_ctl(self, action, mode=None):
        argv = ["pg_ctl", "-D", self.pg_data, "-l", os.path.join(self.pg_data, "server.log"), "-w", "-t", "60"]
        if mode:
            argv += ["-m", mode]
        argv.append(action)
        r = subprocess.run(self._pg_cmd(*argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0 and action != "stop":
            raise RuntimeError(f"pg_ctl {action} failed: {r.stdout.strip()}")

    def psql(self, sql):
        """Runs one query returning JSON (wrap it in json_agg); returns the parsed value."""
        r = subprocess.run(
            ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.pg_port),
             "-U", "postgres", "-d", "ostore", "-c", sql],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
        )
        if r.returncode != 0:
            raise RuntimeError(f"psql: {r.stderr.strip()}")
        out = r.stdout.strip()
        return json.loads(out) if out else None

    def rows(self, sql):
        return self.psql(f"select coalesce(json_agg(t), '[]') from ({sql}) t")

    def scalar(self, sql):
        return self.psql(f"select to_json(({sql}))")

    # -- broker (ours alone: its own port and directory)

    def broker(self, action, keep=False):
        env = dict(os.environ, KAFKA_BROKER_PORT=str(self.broker_port), KAFKA_BROKER_DIR=self.broker_dir,
                   KAFKA_BROKER_IMPL=self.args.broker)
        if keep:
            env["KAFKA_BROKER_KEEP_DATA"] = "1"
        old_log = os.path.join(self.broker_dir, "log")
        if action == "start" and os.path.exists(old_log):  # `start` truncates its log: keep the last one
            os.replace(old_log, os.path.join(self.broker_dir, f"log.{time.strftime('%H%M%S')}"))
        r = subprocess.run([os.path.join(ROOT, "scripts", "kafka-broker"), action], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"kafka-broker {action} failed: {r.stdout.strip()[-2000:]}")
        if action == "start":
            self.broker_started = True
        elif action == "stop":
            self.broker_started = False

    def process_broker(self):
        """Apache Kafka and Tansu are processes of scripts/kafka-broker; the mock is ours."""
        return self.args.broker in ("kafka", "tansu")

    def start_broker(self):
        if self.process_broker():
            self.broker("start")
            return
        os.makedirs(self.broker_dir, exist_ok=True)
        out_path = os.path.join(self.broker_dir, "address")
        with open(out_path, "wb") as out, open(os.path.join(self.broker_dir, "log"), "ab") as err:
            p = subprocess.Popen([self.tools, "kafka", "mock"], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=dict(os.environ, RUST_LOG="warn"))
        self.procs["broker"] = p
        self.broker_started = True

        def address():
            if p.poll() is not None:
                raise RuntimeError("the mock broker exited; see broker/log")
            with open(out_path) as f:
                line = f.readline().strip()
            return line if line.endswith(tuple("0123456789")) and ":" in line else None
        wait_for(address, 30, "the mock broker's address")
        self.kafka = address()

    def broker_down(self):
        """An outage: Apache Kafka or Tansu is SIGKILLed; the mock closes every connection and
        refuses new ones."""
        if self.process_broker():
            self.kill_broker()
        else:
            self.procs["broker"].send_signal(signal.SIGUSR1)

    def broker_up(self):
        if self.process_broker():
            self.broker("start", keep=True)
        else:
            self.procs["broker"].send_signal(signal.SIGUSR2)

    def kill_broker(self):
        with open(os.path.join(self.broker_dir, "pid")) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def broker_panicked(self):
        """Tansu logs a panic of its storage task, after which it serves nobody."""
        if self.args.broker != "tansu":
            return False
        try:
            with open(os.path.join(self.broker_dir, "log"), errors="replace") as f:
                return "panicked" in f.read()
        except OSError:
            return False

    # -- simulators and service

    def _spawn(self, name, argv, env):
        full_env = dict(os.environ)
        for k in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            full_env.pop(k, None)
        full_env.update(env)
        out = self._log(name)
        out.write(f"\n==== {time.strftime('%H:%M:%S')} start {' '.join(argv)}\n".encode())
        out.flush()
        p = subprocess.Popen([self.bin, *argv], env=full_env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        self.procs[name] = p
        return p

    def start_sims(self, auto_advance_ms):
        self._spawn("catalog", ["sim", "catalog"], {
            "LISTEN_ADDR": f"127.0.0.1:{self.catalog_port}", "RUST_LOG": "warn", "LOG_FORMAT": "pretty"})
        self._spawn("shipments", ["sim", "shipments", "--auto-advance-ms", str(auto_advance_ms)], {
            "LISTEN_ADDR": f"127.0.0.1:{self.shipments_port}", "KAFKA_BOOTSTRAP_SERVERS": self.kafka,
            "RUST_LOG": "warn", "LOG_FORMAT": "pretty"})
        for url in (self.catalog, self.shipments):
            wait_for(lambda u=url: http("GET", u + "/sim/faults", timeout=2)[0] == 200, 30, f"simulator {url}")

    def service_env(self, i):
        return {
            "DATABASE_URL": self.db_url,
            "DATABASE_MAX_CONNECTIONS": "16",
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka,
            "CATALOG_URL": self.catalog,
            "SHIPMENTS_URL": self.shipments,
            "JWT_SECRET": JWT_SECRET,
            "LISTEN_ADDR": f"127.0.0.1:{self.api_ports[i]}",
            "ORDER_LIMIT_PER_USER": "0",
            "LOGIN_LIMIT_PER_ACCOUNT": "1000",
            "LOGIN_LIMIT_PER_ADDRESS": "1000",
            "ACCESS_TOKEN_TTL_SECONDS": "7200",
            "SAGA_RETRY_SCALE": str(self.args.retry_scale),
            "SAGA_LEASE_MS": str(self.args.lease_ms),
            "ORDER_WAIT_MS": "3000",
            "RUST_LOG": os.environ.get("CHAOS_SERVICE_LOG", "warn"),
            "LOG_FORMAT": "pretty",
        }

    def run_bin(self, argv, env, check=True):
        full_env = dict(os.environ)
        full_env.update(env)
        r = subprocess.run([self.bin, *argv], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {r.stdout.strip()[-2000:]}")
        return r.stdout

    def start_service(self, i):
        self.service_starts += 1
        self._spawn(f"service-{i}", ["serve"], dict(self.service_env(i), ROLES="api,worker,relay"))

    def start_consumer(self, i):
        """The tracking consumer of instance i, in a process of its own (see kill_consumer)."""
        self.consumer_starts += 1
        env = dict(self.service_env(i), ROLES="consumer", LISTEN_ADDR=f"127.0.0.1:{free_port()}")
        self._spawn(f"consumer-{i}", ["serve"], env)

    def kill_consumer(self, i):
        p = self.procs.get(f"consumer-{i}")
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)

    def service_alive(self, i):
        p = self.procs.get(f"service-{i}")
        return p is not None and p.poll() is None

    def kill_service(self, i):
        p = self.procs.get(f"service-{i}")
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)

    def wait_service(self, i, timeout=90):
        """Waits until instance i answers /livez; returns the seconds it took (raises on timeout)."""
        t0 = time.monotonic()

        def up():
            if not self.service_alive(i):
                raise RuntimeError(f"service instance {i} exited; see service-{i}.log")
            try:
                return http("GET", self.apis[i] + "/livez", timeout=2)[0] == 200
            except ConnError:
                return False
        wait_for(up, timeout, f"/livez of service instance {i}")
        return time.monotonic() - t0

    # -- teardown

    def close(self):
        for name, p in list(self.procs.items()):
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 8
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.process_broker() and (self.broker_started or os.path.exists(os.path.join(self.broker_dir, "pid"))):
            try:
                self.broker("stop")
            except Exception as e:  # noqa: BLE001 -- best effort at teardown
                log(f"stopping the broker: {e}")
        if self.pg_started:
            self.pg_ctl("stop", mode="immediate")


def wait_for(pred, timeout, what, interval=0.25):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except ConnError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
