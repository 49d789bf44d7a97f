#!/usr/bin/env python3
"""Benchmark harness: malla's sidecar proxy against HAProxy, nginx, Envoy and "direct".

Stdlib only. Normally started by `bench/run`, which installs the tools and builds malla
first; see bench/README.md for what is measured and how. This file starts the upstream and
every proxy, drives wrk / oha / h2load, samples RSS and CPU from /proc, and writes one JSON
file with every raw measurement plus the medians and ratios (computed by report.py).

Every process it starts runs in its own session (process group) and is stopped again in a
`finally` block, on SIGINT/SIGTERM too; the pids are also written to a file that bench/run's
EXIT trap reads as a last resort. Every wait and every loop is bounded.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import http.client

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
import report  # noqa: E402  (bench/report.py)

BODY = b"hello\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# "malla" runs with one worker, like for like with the single-worker peers; "malla-default"
# runs the worker count a user gets (one per core).
ALL_TARGETS = ["direct", "malla", "malla-default", "haproxy", "nginx", "envoy"]
ALL_TESTS = ["h1", "lat", "h2"]
# Peers that cannot forward HTTP/2 to an HTTP/2 upstream: no h2 measurement (n/a).
H2_UNSUPPORTED = {
    "nginx": "nginx's proxy module speaks only HTTP/1.x to upstreams (grpc_pass is gRPC-only); n/a",
}


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- processes

class Procs:
    """Registry of everything started, so that all of it is stopped whatever happens."""

    def __init__(self, pidfile):
        self.pidfile = pidfile
        self.live = []

    def _write(self):
        with open(self.pidfile, "w") as f:
            for p in self.live:
                f.write(f"{p.pid}\n")

    def start(self, argv, logpath, cpus=None):
        if cpus is not None:
            argv = ["taskset", "-c", cpus] + argv
        lf = open(logpath, "ab")
        lf.write(("$ " + shlex.join(argv) + "\n").encode())
        lf.flush()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd=os.path.dirname(logpath))
        lf.close()
        self.live.append(p)
        self._write()
        return p

    def stop(self, p, grace=5.0):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # its own session: pgid == pid
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        # children left behind in the group (e.g. an nginx worker whose master died)
        for _ in range(50):
            if not session_pids(p.pid):
                break
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        if p in self.live:
            self.live.remove(p)
            self._write()

    def stop_all(self):
        for p in list(reversed(self.live)):
            try:
                self.stop(p, grace=3.0)
            except Exception as e:  # keep stopping the others
                print(f"warning: could not stop pid {p.pid}: {e}", file=sys.stderr)


def session_pids(sid):
    """PIDs of live (non-zombie) processes whose session id is `sid`."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rfind(")") + 2:].split()
        # rest[0]=state, rest[1]=ppid, rest[2]=pgrp, rest[3]=session
        if rest[0] != "Z" and int(rest[3]) == sid:
            out.append(int(d))
    return sorted(out)


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        rest = s[s.rfind(")") + 2:].split()
        return int(rest[11]) + int(rest[12])  # utime + stime
    except OSError:
        return 0


class RssSampler(threading.Thread):
    """Samples VmRSS of a fixed set of pids every `interval` s; keeps the maxima."""

    def __init__(self, pids, interval=0.1):
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.max_sum = 0
        self.max_per = {p: 0 for p in pids}
        self.samples = 0
        self._halt = threading.Event()

    def sample(self):
        total = 0
        for p in self.pids:
            r = rss_kib(p)
            total += r
            self.max_per[p] = max(self.max_per[p], r)
        self.max_sum = max(self.max_sum, total)
        self.samples += 1

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def finish(self):
        self._halt.set()
        self.join(timeout=5)
        self.sample()


def cpu_busy_jiffies():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    total = sum(v[:8])
    return total - idle, total


def proc_cpu_jiffies():
    """user + nice + system + irq + softirq jiffies of the whole machine: with tick-based
    accounting a task's stime also holds the irq/softirq ticks taken while it ran (loopback
    networking), which /proc/stat books separately; steal and idle are left out."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6]


def own_rusage_s():
    """CPU seconds of this harness (all threads) and of its reaped children (load generators)."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def background_busy(seconds):
    """Share of the machine's CPU (0..1) busy during `seconds` while we run nothing."""
    b0, t0 = cpu_busy_jiffies()
    time.sleep(seconds)
    b1, t1 = cpu_busy_jiffies()
    return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_port(port, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def probe_h1(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        c.request("GET", "/")
        r = c.getresponse()
        body = r.read()
        return r.status == 200 and body == BODY, f"status {r.status} body {body[:40]!r}"
    except Exception as e:
        return False, repr(e)
    finally:
        c.close()


def probe_h2(port):
    try:
        out = subprocess.run(["h2load", "-n", "4", "-c", "1", f"http://127.0.0.1:{port}/"],
                             capture_output=True, text=True, timeout=10).stdout
    except subprocess.TimeoutExpired:
        return False, "h2load probe timed out"
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    st = re.search(r"status codes: (\d+) 2xx", out)
    ok = bool(m and st and int(m.group(1)) == 4 and int(st.group(1)) == 4)
    return ok, out.strip().splitlines()[-3:] if out else "no output"


def wait_ready(port, proto, proc, timeout=30.0):
    """Port open, then a real request through it answered 200 "hello\\n" (bounded)."""
    if not wait_port(port, proc, timeout):
        return False, "port never opened" + (" (process exited)" if proc and proc.poll() is not None else "")
    deadline = time.monotonic() + timeout
    why = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False, "process exited"
        ok, why = (probe_h1 if proto == "h1" else probe_h2)(port)
        if ok:
            return True, ""
        time.sleep(0.2)
    return False, f"probe failed: {why}"


# --------------------------------------------------------------------------- configs

def upstream_nginx_conf(d, h1_port, h2_port):
    return f"""# upstream: fixed 6-byte response, one worker, no access log
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp-cb; proxy_temp_path {d}/tmp-p; fastcgi_temp_path {d}/tmp-f;
  uwsgi_temp_path {d}/tmp-u; scgi_temp_path {d}/tmp-s;
  keepalive_requests 1000000000;
  keepalive_timeout 600s;
  server {{
    listen 127.0.0.1:{h1_port};
    location / {{ default_type text/plain; return 200 "hello\\n"; }}
  }}
  # nginx 1.22: "listen ... http2" without ssl serves HTTP/2 with prior knowledge (h2c) only
  server {{
    listen 127.0.0.1:{h2_port} http2;
    location / {{ default_type text/plain; return 200 "hello\\n"; }}
  }}
}}
"""


def haproxy_conf(d, port, up, proto):
    h2 = " proto h2" if proto == "h2" else ""
    return f"""global
  nbthread 1
  maxconn 4096
  log stderr format raw local0 err

defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s

frontend fe
  bind 127.0.0.1:{port}{h2}
  default_backend be

backend be
  server up 127.0.0.1:{up}{h2} maxconn 4096
"""


def nginx_proxy_conf(d, port, up):
    return f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp-cb; proxy_temp_path {d}/tmp-p; fastcgi_temp_path {d}/tmp-f;
  uwsgi_temp_path {d}/tmp-u; scgi_temp_path {d}/tmp-s;
  keepalive_requests 1000000000;
  keepalive_timeout 600s;
  upstream up {{
    server 127.0.0.1:{up};
    keepalive 128;
    keepalive_requests 1000000000;
    keepalive_timeout 600s;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


def envoy_conf(port, up, proto):
    cluster = {
        "name": "up",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "up", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": up}}}}]}]},
    }
    if proto == "h2":
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",  # HTTP/1.1 and h2c prior knowledge on one listener
        "generate_request_id": False,  # the other peers add no request id either
        "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return json.dumps({"static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [cluster]}}, indent=1)


# --------------------------------------------------------------------------- targets

class Bench:
    def __init__(self, a):
        self.a = a
        self.run_dir = a.run_dir
        os.makedirs(self.run_dir, exist_ok=True)
        self.procs = Procs(a.pidfile)
        self.pin = a.pin
        # CPU layout: with --pin, proxy alone on CPU 1; load generator and upstream on CPU 0.
        self.cpu_proxy = "1" if self.pin else None
        self.cpu_other = "0" if self.pin else None
        self.seq = 0
        self.quiet_budget = a.quiet_wait

    def tool(self, argv):
        return (["taskset", "-c", self.cpu_other] if self.cpu_other else []) + argv

    def workdir(self, name):
        self.seq += 1
        d = os.path.join(self.run_dir, f"{self.seq:03d}-{name}")
        os.makedirs(d, exist_ok=True)
        return d

    # ---- upstream
    def start_upstream(self):
        self.up_h1, self.up_h2 = free_ports(2)
        d = self.workdir("upstream-nginx")
        with open(f"{d}/nginx.conf", "w") as f:
            f.write(upstream_nginx_conf(d, self.up_h1, self.up_h2))
        p = self.procs.start(["nginx", "-p", d + "/", "-c", f"{d}/nginx.conf"], f"{d}/stdout.log", self.cpu_other)
        ok1, why1 = wait_ready(self.up_h1, "h1", p, 10)
        ok2, why2 = wait_ready(self.up_h2, "h2", p, 10)
        if not (ok1 and ok2):
            raise SystemExit(f"upstream nginx did not come up: h1 {why1}; h2 {why2}; see {d}")
        self.upstream = p
        self.upstream_pids = session_pids(p.pid) or [p.pid]
        log(f"upstream nginx up: h1 127.0.0.1:{self.up_h1}, h2c 127.0.0.1:{self.up_h2} (pid {p.pid})")

    # ---- proxies
    def argv_for(self, kind, d, port, up, proto):
        if kind == "haproxy":
            with open(f"{d}/haproxy.cfg", "w") as f:
                f.write(haproxy_conf(d, port, up, proto))
            return ["haproxy", "-db", "-f", f"{d}/haproxy.cfg"]
        if kind == "nginx":
            with open(f"{d}/nginx.conf", "w") as f:
                f.write(nginx_proxy_conf(d, port, up))
            return ["nginx", "-p", d + "/", "-c", f"{d}/nginx.conf"]
        if kind == "envoy":
            with open(f"{d}/envoy.json", "w") as f:
                f.write(envoy_conf(port, up, proto))
            return [self.a.envoy_bin, "-c", f"{d}/envoy.json", "--concurrency", "1",
                    "--disable-hot-restart", "-l", "warning", "--base-id-path", f"{d}/base-id"]
        raise ValueError(kind)

    def start_target(self, name, proto):
        """Returns (process or None, port). None for direct."""
        up = self.up_h1 if proto == "h1" else self.up_h2
        if name == "direct":
            return None, up
        (port, admin) = free_ports(2)
        d = self.workdir(f"{name}-{proto}")
        if name in ("malla", "malla-default"):
            if self.a.malla_standin:
                argv = self.argv_for(self.a.malla_standin, d, port, up, proto)
            else:
                tmpl = self.a.malla_cmd
                if name == "malla-default":
                    tmpl = tmpl.replace(" --workers 1", "")
                argv = [x.format(listen=f"127.0.0.1:{port}", upstream=f"127.0.0.1:{up}",
                                 admin=f"127.0.0.1:{admin}", proto=proto, workdir=d)
                        for x in shlex.split(tmpl)]
        else:
            argv = self.argv_for(name, d, port, up, proto)
        p = self.procs.start(argv, f"{d}/stdout.log", self.cpu_proxy)
        ok, why = wait_ready(port, proto, p, 30)
        if not ok:
            self.procs.stop(p)
            tail = ""
            try:
                with open(f"{d}/stdout.log", errors="replace") as f:
                    tail = "".join(f.readlines()[-15:])
            except OSError:
                pass
            raise RuntimeError(f"{name} ({proto}) did not become ready: {why}\n--- {d}/stdout.log ---\n{tail}")
        return p, port

    # ---- load generators
    def run_tool(self, argv, timeout):
        r = subprocess.run(self.tool(argv), capture_output=True, text=True, timeout=timeout)
        self.seq += 1
        name = os.path.basename(argv[0])
        with open(os.path.join(self.run_dir, f"{self.seq:03d}-{name}.txt"), "w") as f:
            f.write(f"$ {shlex.join(argv)}\n(exit {r.returncode})\n{r.stdout}\n{r.stderr}")
        return r.returncode, r.stdout, r.stderr

    def wrk(self, port, dur):
        argv = ["wrk", "-t1", f"-c{self.a.wrk_conns}", f"-d{dur}s", "--timeout", "5s", f"http://127.0.0.1:{port}/"]
        rc, out, err = self.run_tool(argv, dur + 60)
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        n = re.search(r"(\d+) requests in", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        if rc != 0 or not m:
            raise RuntimeError(f"wrk failed (rc {rc}): {out}\n{err}")
        return {"rps": float(m.group(1)), "requests": int(n.group(1)) if n else None,
                "errors": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0),
                "cmd": shlex.join(argv)}

    def oha(self, port, dur, rate):
        argv = [self.a.oha_bin, "--no-tui", "--output-format", "json", "-q", str(rate), "-z", f"{dur}s"]
        if self.a.oha_threads:
            argv += ["--worker-threads", str(self.a.oha_threads)]
        argv += ["-c", str(self.a.lat_conns), f"http://127.0.0.1:{port}/"]
        rc, out, err = self.run_tool(argv, dur + 60)
        try:
            j = json.loads(out)
        except ValueError:
            raise RuntimeError(f"oha failed (rc {rc}): {out[:2000]}\n{err[:2000]}")
        lp = j["latencyPercentiles"]
        status = j.get("statusCodeDistribution", {})
        non2xx = sum(v for k, v in status.items() if not str(k).startswith("2"))
        errs = j.get("errorDistribution", {}) or {}
        # requests still in flight when -z ends are "aborted due to deadline": not errors
        deadline = sum(v for k, v in errs.items() if "deadline" in k)
        return {"p50_ms": lp["p50"] * 1e3, "p99_ms": lp["p99"] * 1e3, "p999_ms": lp["p99.9"] * 1e3,
                "rps": j["summary"]["requestsPerSec"], "requests": sum(status.values()),
                "errors": non2xx + sum(errs.values()) - deadline, "error_kinds": errs,
                "cmd": shlex.join(argv)}

    def h2load(self, port, dur, warm=0):
        argv = ["h2load", "-t1", f"-c{self.a.h2_conns}", f"-m{self.a.h2_streams}", "-D", str(dur)]
        if warm:
            argv += ["--warm-up-time", str(warm)]
        argv.append(f"http://127.0.0.1:{port}/")
        rc, out, err = self.run_tool(argv, dur + warm + 60)
        m = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
        req = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                        r"(\d+) errored, (\d+) timeout", out)
        st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
        if not (m and req and st):
            raise RuntimeError(f"h2load failed (rc {rc}): {out}\n{err}")
        done = int(req.group(2))
        return {"rps": float(m.group(1)), "requests": done,
                # failed + errored + timeout + non-2xx (h2load's 2xx count can be off by one
                # against "done" at the warm-up boundary, so it is not compared with it)
                "errors": int(req.group(4)) + int(req.group(5)) + int(req.group(6))
                + int(st.group(2)) + int(st.group(3)) + int(st.group(4)),
                "cmd": shlex.join(argv)}

    # ---- one measurement
    def measure(self, rnd, test, name):
        proto = "h2" if test == "h2" else "h1"
        rec = {"round": rnd, "test": test, "target": name}
        p, port = self.start_target(name, proto)
        pids = (session_pids(p.pid) or [p.pid]) if p else []
        # settle, and see whether anything else is using the CPU (a build would skew everything):
        # wait for it to stop, within a budget for the whole run, then go on with a warning
        bg = background_busy(0.4)
        if bg > 0.10 and self.quiet_budget > 0:
            log(f"    {bg:.0%} of the CPU busy elsewhere; waiting for it to calm down "
                f"({self.quiet_budget} s of waiting left for this run)")
            waited = 0
            while bg > 0.10 and self.quiet_budget > 0:
                self.quiet_budget -= 1
                waited += 1
                bg = background_busy(1.0)
            log(f"    waited {waited} s; {bg:.0%} busy now")
        rec["background_cpu"] = round(bg, 3)
        if rec["background_cpu"] > 0.10:
            log(f"    warning: {rec['background_cpu']:.0%} of the CPU busy before this measurement "
                "(something else is running?)")
        if p:
            rec["rss_idle_kib"] = sum(rss_kib(x) for x in pids)
            rec["rss_idle_largest_kib"] = max(rss_kib(x) for x in pids)
            rec["nproc"] = len(pids)
        try:
            warm = self.a.warmup
            if test == "h1":
                if warm:
                    self.wrk(port, warm)
            elif test == "lat":
                if warm:
                    self.oha(port, warm, self.a.lat_rate)
            sampler = RssSampler(pids) if p else None
            if sampler:
                sampler.start()
            c0 = sum(cpu_ticks(x) for x in pids)
            u0 = sum(cpu_ticks(x) for x in self.upstream_pids)
            m0, o0 = proc_cpu_jiffies(), own_rusage_s()
            t0 = time.monotonic()
            if test == "h1":
                r = self.wrk(port, self.a.h1_duration)
            elif test == "lat":
                r = self.oha(port, self.a.lat_duration, self.a.lat_rate)
            else:
                r = self.h2load(port, self.a.h2_duration, warm=warm)
            wall = time.monotonic() - t0
            c1 = sum(cpu_ticks(x) for x in pids)
            u1 = sum(cpu_ticks(x) for x in self.upstream_pids)
            m1, o1 = proc_cpu_jiffies(), own_rusage_s()
            # CPU used during the measurement by processes that are not ours (proxy, upstream,
            # load generator, this harness), as a share of the whole machine
            foreign = (m1 - m0 - (c1 - c0) - (u1 - u0)) / CLK_TCK - (o1 - o0)
            # (accounting is per 10 ms tick: expect ±1 % around 0 on a quiet machine)
            rec["foreign_cpu"] = round(foreign / (wall * (os.cpu_count() or 1)), 3)
            if rec["foreign_cpu"] > 0.05:
                log(f"    warning: {rec['foreign_cpu']:.0%} of the CPU went to other processes "
                    "during this measurement")
            if p and p.poll() is not None:
                raise RuntimeError(f"{name} exited (status {p.returncode}) during the measurement; "
                                   f"see its log under {self.run_dir}")
            if sampler:
                sampler.finish()
                rec["rss_peak_kib"] = sampler.max_sum
                rec["rss_peak_largest_kib"] = max(sampler.max_per.values())
                rec["rss_samples"] = sampler.samples
                rec["cpu_s"] = (c1 - c0) / CLK_TCK
                rec["wall_s"] = wall
            rec.update(r)
        finally:
            if p:
                self.procs.stop(p)
        return rec

    def versions(self):
        def first(argv, pat=None):
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
                s = (r.stdout + r.stderr).strip()
            except Exception as e:
                return f"unavailable ({e.__class__.__name__})"
            if pat:
                m = re.search(pat, s)
                return m.group(1) if m else s.splitlines()[0] if s else ""
            return s.splitlines()[0] if s else ""
        v = {
            "nginx": first(["nginx", "-v"], r"nginx/(\S+)"),
            "haproxy": first(["haproxy", "-v"], r"version (\S+)"),
            "envoy": first([self.a.envoy_bin, "--version"], r"version: \S+?/([\d.]+)/"),
            "wrk": first(["wrk", "-v"], r"wrk (\S+)"),
            "h2load": first(["h2load", "--version"], r"nghttp2/(\S+)"),
            "oha": first([self.a.oha_bin, "--version"], r"oha (\S+)"),
            "python": platform.python_version(),
        }
        if self.a.malla_standin:
            v["malla"] = f"STAND-IN: {self.a.malla_standin} {v.get(self.a.malla_standin, '')}"
        else:
            exe = shlex.split(self.a.malla_cmd)[0]
            mv = first([exe, "--version"])
            mv = mv[len("malla "):] if mv.startswith("malla ") else mv
            try:
                import hashlib
                with open(exe, "rb") as f:
                    mv += f", sha256 {hashlib.sha256(f.read()).hexdigest()[:12]}"
            except OSError:
                pass
            try:
                rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, timeout=10).stdout.strip()
                dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "crates"],
                                       capture_output=True, text=True, timeout=10).stdout.strip()
            except Exception:
                rev, dirty = "", ""
            v["malla"] = f"{mv} (git {rev or 'no commit'}{', uncommitted changes in crates/' if dirty else ''})"
        return v


def machine_info():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1048576:.1f} GiB"
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(), "memory": mem,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def exit_on_signals():
    """SIGTERM / SIGINT / SIGHUP raise SystemExit, so that `finally` blocks stop everything."""
    def on_signal(sig, _frame):
        raise SystemExit(f"interrupted by signal {sig}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def run_rounds(b, rounds, plan, results):
    """Measures `plan`, a list of (test, [target, ...]), `rounds` times: the tests in turn
    within a round, the targets of each test in an order rotated every round. Appends each
    record to results["runs"] and each failed measurement to results["failures"]."""
    for rnd in range(rounds):
        for test, names in plan:
            k = rnd % len(names) if names else 0
            order = names[k:] + names[:k]  # rotate so no target is always first/last
            for name in order:
                if b.upstream.poll() is not None:
                    raise SystemExit("upstream nginx died; see its log under " + b.run_dir)
                log(f"round {rnd + 1}/{rounds} test {test:<3} target {name:<7} ...")
                try:
                    rec = b.measure(rnd, test, name)
                except (RuntimeError, subprocess.TimeoutExpired, KeyError) as e:
                    msg = f"round {rnd + 1} {test} {name}: {e}"
                    log("FAILED " + msg)
                    results["failures"].append(msg)
                    continue
                results["runs"].append(rec)
                log("    " + report.one_line(rec))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(ALL_TARGETS))
    ap.add_argument("--tests", default=",".join(ALL_TESTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--h1-duration", type=int, default=10)
    ap.add_argument("--lat-duration", type=int, default=10)
    ap.add_argument("--h2-duration", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1, help="seconds of load before each measurement (0: none)")
    ap.add_argument("--wrk-conns", type=int, default=50)
    ap.add_argument("--lat-rate", type=int, default=2000)
    ap.add_argument("--lat-conns", type=int, default=16)
    ap.add_argument("--oha-threads", type=int, default=1,
                    help="oha --worker-threads (0: oha's default, one per core); 1 keeps the load "
                         "generator's own footprint small and the same for every target")
    ap.add_argument("--h2-conns", type=int, default=10)
    ap.add_argument("--h2-streams", type=int, default=10)
    ap.add_argument("--pin", action="store_true")
    ap.add_argument("--quiet-wait", type=int, default=120,
                    help="seconds, over the whole run, to wait for other CPU use to stop before a measurement")
    ap.add_argument("--mode", default="full")
    # Given through the environment, not argv, so that a `pkill -f malla` aimed at proxies
    # elsewhere on this shared machine does not hit the harness itself.
    ap.add_argument("--malla-cmd", default=os.environ.get("BENCH_MALLA_CMD") or (
        os.path.join(ROOT, "target/release/malla")
        + " proxy --listen {listen} --upstream {upstream} --workers 1 --admin {admin}"))
    ap.add_argument("--malla-standin", default=os.environ.get("BENCH_MALLA_STANDIN", ""),
                    choices=["", "haproxy", "nginx", "envoy"])
    ap.add_argument("--envoy-bin", required=True)
    ap.add_argument("--oha-bin", default="oha")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--pidfile", required=True)
    a = ap.parse_args()

    targets = [t for t in a.targets.split(",") if t]
    tests = [t for t in a.tests.split(",") if t]
    for t in targets:
        if t not in ALL_TARGETS:
            raise SystemExit(f"unknown target {t!r}; choose from {ALL_TARGETS}")
    for t in tests:
        if t not in ALL_TESTS:
            raise SystemExit(f"unknown test {t!r}; choose from {ALL_TESTS}")

    b = Bench(a)
    exit_on_signals()

    results = {
        "schema": 1,
        "mode": a.mode,
        "machine": machine_info(),
        "versions": b.versions(),
        "malla_standin": a.malla_standin or None,
        "malla_cmd": None if a.malla_standin else a.malla_cmd,
        "params": {k: getattr(a, k) for k in ("rounds", "h1_duration", "lat_duration", "h2_duration", "warmup",
                                              "wrk_conns", "lat_rate", "lat_conns", "oha_threads", "h2_conns", "h2_streams", "pin")},
        "targets": targets, "tests": tests,
        "not_applicable": {f"h2/{k}": v for k, v in H2_UNSUPPORTED.items() if k in targets and "h2" in tests},
        "failures": [],
        "runs": [],
    }
    log(f"machine: {results['machine']}")
    log(f"versions: {results['versions']}")
    log(f"CPU layout: {'proxy on CPU 1; load generator + upstream on CPU 0' if a.pin else 'no pinning (all share both CPUs)'}")
    t_start = time.monotonic()
    try:
        b.start_upstream()
        plan = [(test, [t for t in targets if not (test == "h2" and t in H2_UNSUPPORTED)]) for test in tests]
        run_rounds(b, a.rounds, plan, results)
    finally:
        b.procs.stop_all()
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        results["summary"] = report.summarize(results)
        with open(a.out_json, "w") as f:
            json.dump(results, f, indent=1)
        log(f"wrote {a.out_json}")


if __name__ == "__main__":
    main()
