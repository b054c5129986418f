#!/usr/bin/env python3
"""Deny-push latency of the CA's trust feed with N connected proxies (issue 14).

Starts `warden ca serve`, N `warden proxy` sidecars (each with a join-token
identity, so each follows the CA's trust feed by long poll) in front of one
tiny HTTP app, and a client with a certificate for spiffe://example.org/client.
Then, R times:

  deny:  t0, run `warden ca deny --spiffe-id .../client` (another process, as
         an operator would); one thread per proxy opens a new mTLS connection
         every --interval, sends GET / and stops at the first refusal (TLS
         alert or EOF instead of an HTTP answer: with TLS 1.3 the client's
         handshake completes before the server has checked the client
         certificate, so the refusal shows on the first read).
         Sample: time of the first refusal - t0.
  allow: the same with `warden ca allow`, until each proxy answers 200 again.

Prints p50/p90/p99/max (nearest rank) over all N*R samples of each, the
CA's CPU seconds (utime+stime from /proc/PID/stat) during startup, idle and
the rounds, and, from the JSON logs, when the CA saw the change ("trust feed
moved on") and when each proxy applied it ("deny list changed"), which
separates warden's push latency from the polling client's.

Python 3 standard library only. Example:

  python3 benches/deny-push.py --warden target/release/warden --proxies 100 --rounds 10
"""

import argparse
import datetime
import json
import math
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

TD = "example.org"
CLIENT_ID = f"spiffe://{TD}/client"

APP_CODE = r"""
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
s = S(("127.0.0.1", 0), H)
print("listening app 127.0.0.1:%d" % s.server_address[1], flush=True)
print("ready", flush=True)
s.serve_forever()
"""


def log(msg):
    print(msg, flush=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.warden = os.path.abspath(args.warden)
        self.work = args.workdir or tempfile.mkdtemp(prefix="deny-push-")
        os.makedirs(self.work, exist_ok=True)
        self.cadir = os.path.join(self.work, "ca")
        self.procs = []  # (name, Popen)
        self.ca = None
        self.app = None
        self.proxies = []  # dicts: name, proc, app addr, admin addr, log
        self.samples = {"deny": [], "allow": []}  # (round, proxy index, seconds)
        self.missed = {"deny": [], "allow": []}  # (round, proxy index)
        self.periods = {"deny": [], "allow": []}  # seconds between attempts
        self.anomalies = []  # (phase, round, proxy, what)
        self.rounds = []  # per round: dict of wall times and command durations
        self.lock = threading.Lock()
        self.trace = []  # with --json: every attempt (phase, round, proxy, start, end, result)

    # ---- processes -------------------------------------------------------

    def env(self, level):
        e = dict(os.environ)
        e["WARDEN_LOG"] = level
        e["WARDEN_LOG_FORMAT"] = "json"
        return e

    def run(self, *argv, check=True):
        p = subprocess.run(
            [self.warden, *argv],
            capture_output=True,
            text=True,
            env=self.env("warn"),
            timeout=60,
        )
        if check and p.returncode != 0:
            raise RuntimeError(
                f"warden {' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}"
            )
        return p

    def spawn(self, name, argv, level="warn"):
        out = open(os.path.join(self.work, f"{name}.out"), "w")
        err = open(os.path.join(self.work, f"{name}.log"), "w")
        p = subprocess.Popen(
            argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env(level)
        )
        out.close()
        err.close()
        self.procs.append((name, p))
        return p

    def wait_ready(self, name, p, timeout=60.0):
        """Reads NAME.out until `ready`; returns {listener: "host:port"}."""
        path = os.path.join(self.work, f"{name}.out")
        deadline = time.monotonic() + timeout
        while True:
            with open(path) as f:
                lines = f.read().splitlines()
            addrs = {}
            for line in lines:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "listening":
                    addrs[parts[1]] = parts[2]
                elif parts == ["ready"]:
                    return addrs
            if p.poll() is not None:
                raise RuntimeError(
                    f"{name} exited {p.returncode} before ready: {self.tail(name)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready in {timeout:.0f} s: {self.tail(name)}")
            time.sleep(0.02)

    def tail(self, name, n=20):
        try:
            with open(os.path.join(self.work, f"{name}.log")) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def cleanup(self):
        live = [(n, p) for n, p in self.procs if p.poll() is None]
        for _, p in live:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        for _, p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    # ---- measurements ----------------------------------------------------

    @staticmethod
    def cpu_seconds(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state): utime is field 14, stime field 15
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def proxies_cpu(self):
        total = 0.0
        for px in self.proxies:
            try:
                total += self.cpu_seconds(px["proc"].pid)
            except OSError:
                pass
        return total

    @staticmethod
    def self_cpu():
        t = os.times()
        return t.user + t.system

    @staticmethod
    def children_cpu():
        """CPU of waited-for children: the `warden ca deny|allow` commands."""
        t = os.times()
        return t.children_user + t.children_system

    def ours_cpu(self):
        """CPU seconds of everything this bench runs."""
        return (self.cpu_seconds(self.ca.pid) + self.proxies_cpu() + self.self_cpu()
                + self.cpu_seconds(self.app.pid) + self.children_cpu())

    @staticmethod
    def machine_cpu():
        """(busy, steal) CPU seconds of the whole machine from /proc/stat."""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice
        hz = os.sysconf("SC_CLK_TCK")
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        return busy / hz, v[7] / hz

    def http_get(self, addr, path):
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode(errors="replace")

    def metric(self, addr, name):
        _, body = self.http_get(addr, "/metrics")
        for line in body.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    # ---- the client ------------------------------------------------------

    def tls_context(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # an SVID has only a URI SAN
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(os.path.join(self.cadir, "bundle.pem"))
        cdir = os.path.join(self.work, "client")
        ctx.load_cert_chain(os.path.join(cdir, "cert.pem"), os.path.join(cdir, "key.pem"))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def attempt(self, addr):
        """One new connection and GET /: 'ok' (200), 'refused' (TLS alert,
        reset or EOF after the TCP connection was made) or 'error: ...'."""
        host, port = addr.rsplit(":", 1)
        try:
            raw = socket.create_connection((host, int(port)), timeout=5)
            # the request follows the client's last handshake flight: without
            # this, Nagle waits for the delayed ACK (40 ms) before sending it
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            return f"error: connect: {e}"
        try:
            with self.ctx.wrap_socket(raw) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while b"\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        return "refused"
                    data += chunk
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            return "refused"
        except socket.timeout:
            return "error: timeout"
        except OSError as e:
            return f"error: {e}"
        finally:
            raw.close()
        parts = data.split(b"\r\n", 1)[0].split()
        if len(parts) >= 2 and parts[1] == b"200":
            return "ok"
        status = data.split(b"\r\n", 1)[0].decode(errors="replace")
        return f"error: answered {status}"

    def poll_until(self, phase, rnd, i, want, t0, go, timeout):
        addr = self.proxies[i]["app"]
        go.wait()
        last = None
        while True:
            start = time.monotonic()
            r = self.attempt(addr)
            now = time.monotonic()
            if self.args.json:
                with self.lock:
                    self.trace.append((phase, rnd, i, start - t0[0], now - t0[0], r))
            if last is not None:
                with self.lock:
                    self.periods[phase].append(now - last)
            last = now
            if r == want:
                with self.lock:
                    self.samples[phase].append((rnd, i, now - t0[0]))
                return
            if r.startswith("error"):
                with self.lock:
                    self.anomalies.append((phase, rnd, i, r))
            if now - t0[0] > timeout:
                with self.lock:
                    self.missed[phase].append((rnd, i))
                return
            time.sleep(self.args.interval)

    def phase(self, phase, rnd):
        """Runs `warden ca <phase>` and polls every proxy until it flips."""
        want = "refused" if phase == "deny" else "ok"
        go = threading.Event()
        t0 = [0.0]
        threads = [
            threading.Thread(
                target=self.poll_until,
                args=(phase, rnd, i, want, t0, go, self.args.timeout),
                daemon=True,
            )
            for i in range(len(self.proxies))
        ]
        for t in threads:
            t.start()
        wall0 = time.time()
        t0[0] = time.monotonic()
        cmd = subprocess.Popen(
            [self.warden, "ca", phase, "--dir", self.cadir, "--spiffe-id", CLIENT_ID],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self.env("warn"),
        )
        go.set()
        _, err = cmd.communicate(timeout=60)
        cmd_s = time.monotonic() - t0[0]
        if cmd.returncode != 0:
            raise RuntimeError(f"warden ca {phase} exited {cmd.returncode}: {err.decode()}")
        for t in threads:
            t.join()
        return wall0, cmd_s

    # ---- the run ---------------------------------------------------------

    def setup(self):
        a = self.args
        self.run("ca", "init", "--dir", self.cadir, "--trust-domain", TD)
        self.run("ca", "issue", "--dir", self.cadir, "--spiffe-id", CLIENT_ID,
                 "--out-dir", os.path.join(self.work, "client"))
        self.ctx = self.tls_context()

        self.app = self.spawn("app", [sys.executable, "-c", APP_CODE])
        app_addr = self.wait_ready("app", self.app)["app"]

        self.ca = self.spawn(
            "ca",
            [self.warden, "ca", "serve", "--dir", self.cadir,
             "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
            level="info",
        )
        addrs = self.wait_ready("ca", self.ca)
        self.ca_api, self.ca_admin = addrs["api"], addrs["admin"]
        self.cpu = {"ca_ready": self.cpu_seconds(self.ca.pid)}
        log(f"ca: api {self.ca_api} admin {self.ca_admin} pid {self.ca.pid}")

        bundle = os.path.join(self.cadir, "bundle.pem")
        t_start = time.monotonic()
        for base in range(0, a.proxies, a.batch):
            batch = []
            for i in range(base, min(base + a.batch, a.proxies)):
                name = f"p{i}"
                sid = f"spiffe://{TD}/{name}"
                token = self.run("ca", "token", "--dir", self.cadir, "--spiffe-id", sid).stdout.strip()
                tfile = os.path.join(self.work, f"{name}.token")
                fd = os.open(tfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(token + "\n")
                cfg = os.path.join(self.work, f"{name}.yaml")
                with open(cfg, "w") as f:
                    f.write(
                        f"identity:\n  ca_url: https://{self.ca_api}\n  token_file: {tfile}\n"
                        f"  spiffe_id: {sid}\n  bundle: {bundle}\n"
                        f"admin: 127.0.0.1:0\n"
                        f"inbound:\n  - name: app\n    listen: 127.0.0.1:0\n    app: {app_addr}\n"
                        f"    policy:\n      rules:\n"
                        f"        - {{name: callers, action: allow, from: [{CLIENT_ID}]}}\n"
                    )
                p = self.spawn(name, [self.warden, "proxy", "--config", cfg])
                batch.append((i, name, p))
            for i, name, p in batch:
                addrs = self.wait_ready(name, p)
                self.proxies.append({"name": name, "proc": p, "app": addrs["app"],
                                     "admin": addrs["admin"]})
        log(f"{a.proxies} proxies ready in {time.monotonic() - t_start:.1f} s "
            f"(started {a.batch} at a time)")

        for i, px in enumerate(self.proxies):
            r = self.attempt(px["app"])
            if r != "ok":
                raise RuntimeError(f"{px['name']} ({px['app']}) does not answer 200 before the deny: {r}")
        log(f"client gets 200 from all {len(self.proxies)} proxies")

        deadline = time.monotonic() + 60
        while True:
            watchers = self.metric(self.ca_admin, "warden_ca_trust_watchers")
            behind = [px["name"] for px in self.proxies
                      if self.metric(px["admin"], "warden_proxy_trust_sequence") < 1]
            if watchers >= a.proxies and not behind:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"CA has {watchers:.0f} watchers; not synced: {behind[:10]}")
            time.sleep(0.2)
        log(f"ca: {watchers:.0f} watchers; every proxy has applied the feed")
        self.cpu["ca_started"] = self.cpu_seconds(self.ca.pid)

    def measure(self):
        a = self.args
        c0 = self.cpu_seconds(self.ca.pid)
        time.sleep(a.idle)
        self.cpu["ca_idle"] = self.cpu_seconds(self.ca.pid) - c0

        ca0, px0, me0, w0 = (self.cpu_seconds(self.ca.pid), self.proxies_cpu(),
                             self.self_cpu(), time.monotonic())
        app0, kids0, (busy0, steal0) = (self.cpu_seconds(self.app.pid), self.children_cpu(),
                                        self.machine_cpu())
        for rnd in range(a.rounds):
            row = {"round": rnd}
            r_ours0 = self.ours_cpu()
            r_busy0 = self.machine_cpu()
            for phase in ("deny", "allow"):
                n0 = len(self.samples[phase])
                wall0, cmd_s = self.phase(phase, rnd)
                got = sorted(s for _, _, s in self.samples[phase][n0:])
                row[phase] = {"t0": wall0, "cmd": cmd_s, "got": got}
                dead = [f"{n} (exit {p.returncode})" for n, p in self.procs if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"exited during round {rnd + 1} {phase}: {', '.join(dead)}")
                time.sleep(a.pause)
            r_busy1 = self.machine_cpu()
            row["outside"] = max(0.0, (r_busy1[0] - r_busy0[0]) - (r_busy1[1] - r_busy0[1])
                                 - (self.ours_cpu() - r_ours0))
            self.rounds.append(row)
            d, al = row["deny"], row["allow"]
            log(f"round {rnd + 1:2}: deny  p50 {pct(d['got'], 50):.3f} max {max(d['got'], default=math.nan):.3f} s"
                f" (ca deny cmd {d['cmd']:.3f} s, {len(d['got'])}/{len(self.proxies)} refused);"
                f" allow p50 {pct(al['got'], 50):.3f} max {max(al['got'], default=math.nan):.3f} s"
                f" (cmd {al['cmd']:.3f} s, {len(al['got'])}/{len(self.proxies)} accepted);"
                f" other processes {row['outside']:.1f} CPU-s")
        self.cpu["ca_rounds"] = self.cpu_seconds(self.ca.pid) - ca0
        self.cpu["proxies_rounds"] = self.proxies_cpu() - px0
        self.cpu["client_rounds"] = self.self_cpu() - me0
        self.cpu["rounds_wall"] = time.monotonic() - w0
        self.cpu["app_rounds"] = self.cpu_seconds(self.app.pid) - app0
        self.cpu["commands_rounds"] = self.children_cpu() - kids0
        busy, steal = self.machine_cpu()
        self.cpu["machine_rounds"] = busy - busy0
        self.cpu["steal_rounds"] = steal - steal0
        self.cpu["ca_total"] = self.cpu_seconds(self.ca.pid)

    # ---- logs ------------------------------------------------------------

    def read_log(self, name):
        events = []
        with open(os.path.join(self.work, f"{name}.log")) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    events.append({"level": "RAW", "fields": {"message": line}})
                    continue
                ev["t"] = parse_ts(ev.get("timestamp"))
                events.append(ev)
        return events

    def log_breakdown(self):
        """From the logs: t0 -> CA saw the change -> each proxy applied it."""
        ca_moves = [e["t"] for e in self.read_log("ca")
                    if e.get("fields", {}).get("message") == "trust feed moved on"]
        changes = []  # per proxy: list of (t, added list, removed)
        for px in self.proxies:
            ev = [e for e in self.read_log(px["name"])
                  if e.get("fields", {}).get("message") == "deny list changed"]
            changes.append(ev)
        out = {"ca": {"deny": [], "allow": []}, "proxy": {"deny": [], "allow": []},
               "never": {"deny": [], "allow": []}, "applied": {},
               "push": {"deny": [], "allow": []}}
        for row in self.rounds:
            for phase in ("deny", "allow"):
                t0 = row[phase]["t0"]
                nxt = [m for m in ca_moves if m is not None and m >= t0]
                if nxt:
                    out["ca"][phase].append(nxt[0] - t0)
                for i, ev in enumerate(changes):
                    hit = None
                    for e in ev:
                        if e["t"] is None or e["t"] < t0:
                            continue
                        f = e.get("fields", {})
                        added = str(f.get("added", ""))
                        if phase == "deny" and CLIENT_ID in added:
                            hit = e["t"]
                            break
                        if phase == "allow" and str(f.get("removed", "0")) not in ("0", ""):
                            hit = e["t"]
                            break
                    if hit is None:
                        out["never"][phase].append((row["round"], i))
                    else:
                        out["proxy"][phase].append(hit - t0)
                        if nxt:
                            out["push"][phase].append(hit - nxt[0])
                        out["applied"][(phase, row["round"], i)] = hit - t0
        return out

    @staticmethod
    def expected(e):
        """The warnings a deny is meant to cause."""
        f = e.get("fields", {})
        msg = f.get("message", "")
        return (msg == "deny list changed"
                or (msg == "handshake refused" and f.get("reason") == "denied")
                or (msg == "closing a connection: the CA denied its peer"
                    and f.get("peer") == CLIENT_ID))

    def log_problems(self, want_expected=False):
        """Warnings and errors in all logs, by message: the unexpected ones,
        or (want_expected) the ones a deny is meant to cause."""
        counts = {}
        for name in ["ca"] + [px["name"] for px in self.proxies]:
            for e in self.read_log(name):
                lvl = e.get("level", "")
                msg = e.get("fields", {}).get("message", "")
                if lvl in ("WARN", "ERROR", "RAW") and self.expected(e) == want_expected:
                    who = "ca" if name == "ca" else "proxy"
                    key = (who, lvl, msg)
                    counts.setdefault(key, [0, e])
                    counts[key][0] += 1
        return counts

    def report(self):
        a = self.args
        log("")
        log(f"== deny-push: {len(self.proxies)} proxies, {a.rounds} rounds, "
            f"poll interval {a.interval * 1000:.0f} ms, one polling thread per proxy ==")
        log("latency = time of the client's first refused (deny) / accepted (allow) "
            "connection - t0 (just before `warden ca deny|allow` is started); nearest-rank percentiles")
        for phase in ("deny", "allow"):
            got = sorted(s for _, _, s in self.samples[phase])
            log(f"{phase:5}: n={len(got)} p50 {pct(got, 50):.3f} s  p90 {pct(got, 90):.3f} s  "
                f"p99 {pct(got, 99):.3f} s  max {max(got, default=math.nan):.3f} s  "
                f"(missed: {len(self.missed[phase])})")
        for phase in ("deny", "allow"):
            cmds = sorted(r[phase]["cmd"] for r in self.rounds)
            per = sorted(self.periods[phase])
            log(f"{phase:5}: `warden ca {phase}` process took p50 {pct(cmds, 50):.3f} s max "
                f"{max(cmds):.3f} s; time between one proxy's attempts p50 {pct(per, 50) * 1000:.0f} ms "
                f"p99 {pct(per, 99) * 1000:.0f} ms")
        lb = self.log_breakdown()
        log("from the logs (wall clock, same machine):")
        for phase in ("deny", "allow"):
            ca = sorted(lb["ca"][phase])
            px = sorted(lb["proxy"][phase])
            log(f"  {phase:5}: t0 -> CA 'trust feed moved on' p50 {pct(ca, 50):.3f} max "
                f"{max(ca, default=math.nan):.3f} s; t0 -> proxy 'deny list changed' n={len(px)} "
                f"p50 {pct(px, 50):.3f} p90 {pct(px, 90):.3f} p99 {pct(px, 99):.3f} max "
                f"{max(px, default=math.nan):.3f} s; never logged: {len(lb['never'][phase])}")
        for phase in ("deny", "allow"):
            push = sorted(lb["push"][phase])
            log(f"  {phase:5}: CA 'trust feed moved on' -> proxy 'deny list changed' p50 "
                f"{pct(push, 50) * 1000:.0f} ms p90 {pct(push, 90) * 1000:.0f} ms p99 "
                f"{pct(push, 99) * 1000:.0f} ms max {max(push, default=math.nan) * 1000:.0f} ms")
        for phase in ("deny", "allow"):
            # the client's flip must come after the proxy logged the change
            # (log timestamps are taken after the change is applied, so a
            # few ms of overlap is normal)
            early = [(r, i, s, lb["applied"][(phase, r, i)]) for r, i, s in self.samples[phase]
                     if (phase, r, i) in lb["applied"] and s < lb["applied"][(phase, r, i)] - 0.05]
            lag = sorted(s - lb["applied"][(phase, r, i)] for r, i, s in self.samples[phase]
                         if (phase, r, i) in lb["applied"])
            log(f"  {phase:5}: proxy applied -> client saw it p50 {pct(lag, 50):.3f} p99 "
                f"{pct(lag, 99):.3f} max {max(lag, default=math.nan):.3f} s; "
                f"client flips more than 50 ms before the proxy's log line: {len(early)}"
                + (f" e.g. {early[:5]}" if early else ""))
        c = self.cpu
        log(f"CA CPU: {c['ca_started'] - c['ca_ready']:.2f} s to certify {len(self.proxies)} proxies "
            f"and serve their first watches; {c['ca_idle']:.2f} s over {a.idle:.0f} s idle with "
            f"{len(self.proxies)} watchers; {c['ca_rounds']:.2f} s over the {a.rounds} rounds "
            f"({c['rounds_wall']:.1f} s wall, {2 * a.rounds} changes: "
            f"{c['ca_rounds'] / (2 * a.rounds) * 1000:.0f} ms per change incl. idle time); "
            f"{c['ca_total']:.2f} s in all")
        ours = (c["ca_rounds"] + c["proxies_rounds"] + c["client_rounds"] + c["app_rounds"]
                + c["commands_rounds"])
        log(f"other CPU over the rounds: proxies {c['proxies_rounds']:.2f} s, "
            f"this polling client {c['client_rounds']:.2f} s, app {c['app_rounds']:.2f} s, "
            f"`warden ca deny|allow` commands {c['commands_rounds']:.2f} s; machine busy "
            f"{c['machine_rounds']:.1f} of {c['rounds_wall'] * os.cpu_count():.1f} CPU-s "
            f"(steal {c['steal_rounds']:.1f} s; processes outside this bench about "
            f"{max(0.0, c['machine_rounds'] - c['steal_rounds'] - ours):.1f} s)")
        if self.anomalies:
            kinds = {}
            for phase, _, _, what in self.anomalies:
                kinds[(phase, what)] = kinds.get((phase, what), 0) + 1
            log("client attempts that were neither accepted nor refused:")
            for (phase, what), n in sorted(kinds.items(), key=lambda kv: -kv[1]):
                log(f"  {phase}: {n} x {what}")
        for phase in ("deny", "allow"):
            if self.missed[phase]:
                log(f"{phase}: no flip within {a.timeout:.0f} s: {self.missed[phase]}")
            if lb["never"][phase]:
                log(f"{phase}: proxies that never logged 'deny list changed': {lb['never'][phase][:20]}")
        expected = self.log_problems(want_expected=True)
        log("expected warnings: " + "; ".join(
            f"{who} x{n} '{msg}'" for (who, _, msg), (n, _) in sorted(expected.items())))
        problems = self.log_problems()
        if problems:
            log("other warnings/errors in the logs:")
            for (who, lvl, msg), (n, ev) in sorted(problems.items(), key=lambda kv: -kv[1][0]):
                log(f"  {who} {lvl} x{n}: {msg} {json.dumps(ev.get('fields', {}))[:300]}")
        else:
            log("no other warnings or errors in the CA's or proxies' logs")
        dead = [n for n, p in self.procs if p.poll() is not None]
        if dead:
            log(f"processes that exited during the run: {dead}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"samples": self.samples, "missed": self.missed, "rounds": self.rounds,
                           "cpu": self.cpu, "anomalies": self.anomalies, "attempts": self.trace,
                           "applied": [[*k, v] for k, v in lb["applied"].items()],
                           "logs": {k: v for k, v in lb.items() if k != "applied"}}, f)


def parse_ts(s):
    if not s:
        return None
    try:
        main, _, frac = s.rstrip("Z").partition(".")
        t = datetime.datetime.fromisoformat(main).replace(tzinfo=datetime.timezone.utc)
        return t.timestamp() + (float("0." + frac) if frac else 0.0)
    except ValueError:
        return None


def pct(sorted_vals, p):
    if not sorted_vals:
        return math.nan
    k = max(0, math.ceil(p / 100 * len(sorted_vals)) - 1)
    return sorted_vals[k]


def context(args):
    log(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        model = "?"
    try:
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
    except OSError:
        load = "?"
    log(f"machine: nproc {nproc}, {model}, load average {load}")
    src = args.source or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    log(f"warden source: {src} at {commit}{' (with uncommitted changes)' if dirty else ''}")
    ver = subprocess.run([args.warden, "--version"], capture_output=True, text=True)
    log(f"warden binary: {os.path.abspath(args.warden)} ({ver.stdout.strip() or ver.stderr.strip()}, "
        f"modified {datetime.datetime.fromtimestamp(os.path.getmtime(args.warden)).isoformat(timespec='seconds')})")


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warden", required=True, help="the warden binary")
    ap.add_argument("--proxies", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--interval", type=float, default=0.015,
                    help="seconds between one proxy's attempts (default 0.015)")
    ap.add_argument("--batch", type=int, default=5, help="proxies started at a time")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="give up on a proxy that has not flipped after this many seconds")
    ap.add_argument("--idle", type=float, default=30.0,
                    help="seconds of idle CA CPU measurement before the rounds (default 30: "
                         "longer than the CA's 25 s watch hold, so every proxy polls again once)")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between phases")
    ap.add_argument("--source", help="warden source tree, for the commit (default: this script's repo)")
    ap.add_argument("--workdir", help="keep configs and logs here (default: a temp dir, removed)")
    ap.add_argument("--json", help="write the raw samples, every attempt and the log times here")
    args = ap.parse_args()

    context(args)
    soft, hard = raise_nofile()
    log(f"open files limit: {soft} (hard {hard}); run: proxies {args.proxies}, rounds {args.rounds}")

    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    b = Bench(args)
    ok = False
    try:
        b.setup()
        b.measure()
        b.report()
        ok = True
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); cleaning up; logs kept in {b.work}")
    except Exception as e:
        log(f"FAILED: {e}")
        log(f"logs kept in {b.work}")
    finally:
        b.cleanup()
        if ok and not args.workdir:
            shutil.rmtree(b.work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
