#!/usr/bin/env python3
"""Durable issuances per second through the real `warden ca serve`.

N callers (threads), each with its own identity and one keep-alive mTLS
connection, renew as fast as the CA answers (a renewal is a full issuance:
CSR check, signature, store row, audit line; the CA answers only once both
are durable). Per-identity limits are switched off for the run.

    python3 benches/issuance-load.py --warden target/release/warden --callers 64 --seconds 20

Standard library only, plus `openssl` for the CSRs.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time


def run(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--warden", required=True)
    ap.add_argument("--callers", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--store", help="a postgres:// URL (replicas share it)")
    ap.add_argument("--replicas", type=int, default=1)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="warden-load-")
    procs = []
    try:
        ca = os.path.join(tmp, "ca")
        run(a.warden, "ca", "init", "--dir", ca, "--trust-domain", "bench.test")
        with open(os.path.join(ca, "ca.yaml"), "a") as f:
            f.write("rate_limits: {per_source: 0, per_token: 0, per_identity: 0}\n")
            if a.store:
                f.write(f"store: {a.store}\n")
        callers = []
        for i in range(a.callers):
            sid = f"spiffe://bench.test/w{i}"
            out = os.path.join(tmp, f"w{i}")
            run(a.warden, "ca", "issue", "--dir", ca, "--spiffe-id", sid, "--out-dir", out, "--ttl", "1h")
            csr = run("openssl", "req", "-new", "-key", os.path.join(out, "key.pem"), "-subj", "/",
                      "-addext", f"subjectAltName=critical,URI:{sid}")
            callers.append((out, csr))
        apis = []
        for r in range(a.replicas):
            args = [a.warden, "ca", "serve", "--dir", ca, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
            if a.replicas > 1:
                args += ["--state-dir", os.path.join(tmp, f"state-{r}")]
            p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(p)
            for line in p.stdout:
                if line.startswith("listening api "):
                    host, port = line.split()[2].rsplit(":", 1)
                    apis.append((host, int(port)))
                if line.strip() == "ready":
                    break
        bundle = os.path.join(ca, "bundle.pem")
        counts = [0] * a.callers
        errors = [0] * a.callers
        stop = time.monotonic() + a.seconds
        start_cpu = sum(cpu_seconds(p.pid) for p in procs)

        def caller(i):
            out, csr = callers[i]
            ctx = ssl.create_default_context(cafile=bundle)
            ctx.check_hostname = False
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(os.path.join(out, "cert.pem"), os.path.join(out, "key.pem"))
            body = json.dumps({"csr": csr}).encode()
            host, port = apis[i % len(apis)]
            conn = None
            while time.monotonic() < stop:
                try:
                    if conn is None:
                        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
                        conn.connect()
                        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.request("POST", "/v1/certify", body, {"content-type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status == 200:
                        counts[i] += 1
                    else:
                        errors[i] += 1
                except (OSError, http.client.HTTPException):
                    # The CA closes each connection after 60 s: reconnect.
                    conn = None

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(a.callers)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        cpu = sum(cpu_seconds(p.pid) for p in procs) - start_cpu
        total = sum(counts)
        print(f"commit {run('git', 'rev-parse', '--short', 'HEAD', cwd=os.path.dirname(__file__) or '.').strip()}, nproc {os.cpu_count()}")
        print(f"{a.callers} callers, {a.replicas} replica(s), store {'postgres' if a.store else 'sqlite'}, {elapsed:.1f} s")
        print(f"durable issuances: {total} ({total / elapsed:.0f}/s), refused or failed: {sum(errors)}")
        print(f"CA CPU: {cpu:.1f} s ({cpu / max(total, 1) * 1e6:.0f} us per issuance)")
        listed = run(a.warden, "ca", "list", "certs", "--all", "--dir", ca).count("\n") - 1
        print(f"certificates in the store: {listed} (answered + the {a.callers} offline ones + the CA's own)")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
