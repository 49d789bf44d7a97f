#!/usr/bin/env python3
"""What mTLS between two sidecars costs, against HAProxy and Envoy doing the same (stdlib only).

Normally started by `bench/mtls/run`, which installs the tools and builds malla and the
handshake client first; see bench/README.md. The upstream (one nginx), wrk and oha, the
process handling, the quiet-machine wait and the round rotation are bench/harness.py's
(imported, not copied). This file adds:

- a control plane (`malla control` in a temporary data directory) whose CA certifies every
  side: malla's sidecars through join tokens, HAProxy's and Envoy's through certificates it
  issues to keys made with openssl (the same kind of chain for every pair: an ECDSA P-256
  leaf under malla's P-256 root);
- the pairs: a client side (plaintext in from the load generator) calling a server side that
  forwards to the upstream, secured (mTLS) or plaintext:

    malla-mtls            client sidecar (outbound, `bench-app` discovered) -> server sidecar
                          (`[inbound] mtls = "strict"`), 1 worker each
    malla-plain           the same with `mtls = "off"` on the server sidecar
    malla-*-default       the same with the worker count a user gets (one per core)
    haproxy-tls           haproxy A (`server ... ssl verify required ca-file crt`) -> haproxy B
                          (`bind ... ssl crt ca-file verify required`), nbthread 1 each
    haproxy-plain         the same without ssl
    envoy-tls             envoy A (UpstreamTlsContext with a client certificate) -> envoy B
                          (DownstreamTlsContext requiring one), --concurrency 1 each
    envoy-plain           the same without TLS

  plus `direct` (the load generator against the upstream itself);
- the handshake test: `malla-bench-mtls` (bench/mtls/src/main.rs) opens new TLS 1.3
  connections with a client certificate in a loop against each server side alone (malla's
  inbound, HAProxy B, Envoy B), offering X25519MLKEM768 only, then X25519 only.

    mtls.py measure --malla-bin BIN --hs-bin BIN --envoy-bin BIN --out-json F --run-dir D --pidfile P [options]
    mtls.py report RESULTS.json [--md FILE] [--docs docs/benchmarks.md] [--quiet]
"""

import argparse
import hashlib
import http.client
import json
import os
import platform
import re
import shlex
import socket
import ssl
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
import harness  # noqa: E402  (bench/harness.py)
import report  # noqa: E402  (bench/report.py)

START = "<!-- bench:mtls:start -->"
END = "<!-- bench:mtls:end -->"

SERVICE = "bench-app"      # what the server side is (its certificate's identity)
CLIENT = "bench-client"    # what the client side is

# target -> (family, secured, workers: 1, or 0 = the default, one per core)
PAIRS = {
    "malla-mtls": ("malla", True, 1),
    "malla-plain": ("malla", False, 1),
    "malla-mtls-default": ("malla-default", True, 0),
    "malla-plain-default": ("malla-default", False, 0),
    "haproxy-tls": ("haproxy", True, 1),
    "haproxy-plain": ("haproxy", False, 1),
    "envoy-tls": ("envoy", True, 1),
    "envoy-plain": ("envoy", False, 1),
}
TARGETS = ["direct"] + list(PAIRS)
FAMILIES = ["malla", "malla-default", "haproxy", "envoy"]
SECURED = {"malla": "malla-mtls", "malla-default": "malla-mtls-default", "haproxy": "haproxy-tls",
           "envoy": "envoy-tls"}
PLAIN = {"malla": "malla-plain", "malla-default": "malla-plain-default", "haproxy": "haproxy-plain",
         "envoy": "envoy-plain"}
GROUPS = ["X25519MLKEM768", "X25519"]
HS_SERVERS = ["malla", "malla-default", "haproxy", "envoy"]
TESTS = ["h1", "lat", "hs"]
NAMES = {
    "direct": "direct (no proxy)",
    "malla-mtls": "**malla** mTLS (1 worker)", "malla-plain": "malla plaintext (1 worker)",
    "malla-mtls-default": "**malla** mTLS (default workers)",
    "malla-plain-default": "malla plaintext (default workers)",
    "haproxy-tls": "HAProxy TLS", "haproxy-plain": "HAProxy plaintext",
    "envoy-tls": "Envoy TLS", "envoy-plain": "Envoy plaintext",
    "malla": "**malla** (1 worker)", "malla-default": "**malla** (default workers)",
    "haproxy": "HAProxy", "envoy": "Envoy",
}
HS_NAMES = {"malla": "malla inbound, `mtls = \"strict\"` (1 worker)",
            "malla-default": "malla inbound, `mtls = \"strict\"` (default workers)",
            "haproxy": "HAProxy B (`bind ... ssl verify required`)",
            "envoy": "Envoy B (DownstreamTlsContext, client certificate required)"}
# Key exchange groups of the TLS pairs' configuration: Envoy's both sides are set like
# malla's default (hybrid first, X25519 as the fallback); HAProxy keeps OpenSSL's defaults.
ENVOY_CURVES = ["X25519MLKEM768", "X25519"]
# Goals (issue 14): mTLS keeps at least HAProxy's share of its plaintext throughput; a
# handshake is rare: the client sidecar opens no more mTLS connections than the load
# generator holds open at once (so each is reused for every later request, however long the
# run), which the number per 1,000 requests shows too.


# --------------------------------------------------------------------------- small helpers

def http_get(port, path, timeout=3):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        c.close()


def prom(text):
    """Prometheus / OpenMetrics text -> [(name, {label: value}, float)]."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")), v))
    return out


def msum(samples, name, **labels):
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def by_labels(samples, name, keys):
    out = {}
    for n, lab, v in samples:
        if n == name and v:
            k = "/".join(lab.get(x, "") for x in keys)
            out[k] = out.get(k, 0) + int(v)
    return out


def wait_for(cond, timeout, what):
    """Polls cond() (truthy = done) every 50 ms for at most `timeout` s; raises RuntimeError."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = cond()
            if r:
                return r
        except (OSError, http.client.HTTPException, ValueError) as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"{what} (waited {timeout:.0f} s{f'; last error: {last}' if last else ''})")


def log_tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- configs

def malla_server_toml(name, workers, listen, upstream, admin, control, bundle, token_file, instance, secured):
    w = f"workers = {workers}\n" if workers else "# workers: the default (one per core)\n"
    return f"""# bench/mtls {name}: the server side (inbound -> the upstream)
{w}drain_timeout = "1s"

[inbound]
listen = "{listen}"
forward_to = "{upstream}"
mtls = "{'strict' if secured else 'off'}"

[control]
url = "{control}"
ca_file = "{bundle}"
service = "{SERVICE}"
instance_id = "{instance}"
# registering over TLS takes a certificate of the service, so both server sidecars join
# with a token; with mtls = "off" it is registered as not taking mTLS and called in plaintext
join_token_file = "{token_file}"

[admin]
listen = "{admin}"
"""


def malla_client_toml(name, workers, listen, admin, control, bundle, token_file, instance, secured):
    w = f"workers = {workers}\n" if workers else "# workers: the default (one per core)\n"
    ident = f"""service = "{CLIENT}"
instance_id = "{instance}"
register_address = "127.0.0.1:9"   # nobody calls it: it registers to get its certificate
join_token_file = "{token_file}"
""" if secured else "# no identity: it only discovers, and calls in plaintext\n"
    return f"""# bench/mtls {name}: the client side (outbound -> {SERVICE}, discovered)
{w}drain_timeout = "1s"

[[upstream]]
name = "{SERVICE}"   # no endpoints: discovered from the control plane

[[outbound]]
listen = "{listen}"
upstream = "{SERVICE}"

[control]
url = "{control}"
ca_file = "{bundle}"
{ident}
[admin]
listen = "{admin}"
"""


HAPROXY_DEFAULTS = """defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
"""


def haproxy_a_cfg(d, port, b_port, certs, secured):
    ssl_ = (f" ssl verify required ca-file {certs['bundle']} crt {certs['client_pem']} ssl-min-ver TLSv1.3"
            if secured else "")
    return f"""# bench/mtls haproxy A: plaintext in, {'TLS with a client certificate' if secured else 'plaintext'} to B
global
  nbthread 1
  maxconn 4096
  log stderr format raw local0 err
  stats socket {d}/a.sock mode 600 level user

{HAPROXY_DEFAULTS}
frontend fe
  bind 127.0.0.1:{port}
  default_backend be

backend be
  server b 127.0.0.1:{b_port}{ssl_} maxconn 4096
"""


def haproxy_b_cfg(port, up, certs, secured):
    ssl_ = (f" ssl crt {certs['server_pem']} ca-file {certs['bundle']} verify required ssl-min-ver TLSv1.3"
            if secured else "")
    return f"""# bench/mtls haproxy B: {'TLS requiring a client certificate' if secured else 'plaintext'} in, to the upstream
global
  nbthread 1
  maxconn 4096
  log stderr format raw local0 err

{HAPROXY_DEFAULTS}
frontend fe
  bind 127.0.0.1:{port}{ssl_}
  default_backend be

backend be
  server up 127.0.0.1:{up} maxconn 4096
"""


def _tls_params():
    return {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3",
            "ecdh_curves": ENVOY_CURVES}


def envoy_json(listen, upstream, admin, cluster, downstream_tls=None, upstream_tls=None):
    """One Envoy: an HTTP listener on `listen` routing everything to cluster `cluster` at
    `upstream` (ports), admin on `admin`; TLS on either side when given."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        "generate_request_id": False,
        "route_config": {"name": "r", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
    if downstream_tls:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": dict(
            {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"},
            **downstream_tls)}
    c = {
        "name": cluster, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]},
    }
    if upstream_tls:
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": dict(
            {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"},
            **upstream_tls)}
    return json.dumps({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "l", "stat_prefix": "l",
                           "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                           "filter_chains": [chain]}],
            "clusters": [c]}}, indent=1)


def envoy_server_tls(certs):
    return {"require_client_certificate": True, "common_tls_context": {
        "tls_params": _tls_params(),
        "tls_certificates": [{"certificate_chain": {"filename": certs["server_crt"]},
                              "private_key": {"filename": certs["server_key"]}}],
        "validation_context": {"trusted_ca": {"filename": certs["bundle"]}}}}


def envoy_client_tls(certs):
    return {"common_tls_context": {
        "tls_params": _tls_params(),
        "tls_certificates": [{"certificate_chain": {"filename": certs["client_crt"]},
                              "private_key": {"filename": certs["client_key"]}}],
        # as a sidecar does: the server must prove the called service's identity
        "validation_context": {"trusted_ca": {"filename": certs["bundle"]}, "match_typed_subject_alt_names": [
            {"san_type": "URI", "matcher": {"exact": certs["server_id"]}}]}}}


# --------------------------------------------------------------------------- the bench

class Pair:
    """The processes of one target, in start order (server side first)."""

    def __init__(self, name, d):
        self.name, self.dir = name, d
        self.procs = []     # [(role, Popen)]
        self.port = None    # where the load generator connects
        self.info = {}      # admin ports, sockets...

    def pids(self):
        out = []
        for _, p in self.procs:
            out += harness.session_pids(p.pid) or [p.pid]
        return out

    def role_pids(self):
        return {role: (harness.session_pids(p.pid) or [p.pid]) for role, p in self.procs}

    def dead(self):
        return [role for role, p in self.procs if p.poll() is not None]


class MtlsBench(harness.Bench):

    def __init__(self, a):
        super().__init__(a)
        self.certs = {}
        self.haproxy_group = None

    # ---- the control plane and its CA
    def start_control(self):
        self.cp_port, grpc, dns = harness.free_ports(3)
        d = self.workdir("control")
        self.cp_data = os.path.join(d, "data")
        argv = [self.a.malla_bin, "control", "--data-dir", self.cp_data, "--addr", f"127.0.0.1:{self.cp_port}",
                "--grpc-addr", f"127.0.0.1:{grpc}", "--dns-addr", f"127.0.0.1:{dns}"]
        p = self.procs.start(argv, f"{d}/stdout.log", self.cpu_other)
        self.control = p
        self.bundle = os.path.join(self.cp_data, "trust-bundle.pem")
        token = os.path.join(self.cp_data, "operator.token")
        if not harness.wait_port(self.cp_port, p, 30):
            raise SystemExit(f"malla control did not open 127.0.0.1:{self.cp_port}:\n{log_tail(f'{d}/stdout.log')}")
        try:
            wait_for(lambda: os.path.exists(self.bundle) and os.path.exists(token), 30,
                     "malla control wrote no trust-bundle.pem / operator.token")
        except RuntimeError as e:
            raise SystemExit(f"{e}; see {d}/stdout.log")
        with open(token) as f:
            self.op_token = f.read().strip()
        self.ssl_ctx = ssl.create_default_context(cafile=self.bundle)
        self.identity = self.api("GET", "/v1/identity")
        self.control_pids = harness.session_pids(p.pid) or [p.pid]
        harness.log(f"control plane up: https://127.0.0.1:{self.cp_port} (pid {p.pid}), trust domain "
                    f"{self.identity.get('trust_domain')}")

    def api(self, method, path, body=None, operator=True):
        headers = {"content-type": "application/json"}
        if operator:
            headers["authorization"] = f"Bearer {self.op_token}"
        req = urllib.request.Request(f"https://127.0.0.1:{self.cp_port}{path}", method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, context=self.ssl_ctx, timeout=15) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"control plane {method} {path}: {e.code} {e.read()[:500]!r}") from None

    def join_token(self, service, path):
        tok = self.api("POST", "/v1/tokens", {"service": service, "ttl": "1h"})["token"]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(tok + "\n")
        return path

    def issue(self, service, stem):
        """A key made with openssl, certified by malla's CA for `service`, as files:
        STEM.key, STEM.crt (the chain), STEM.pem (chain + key, for HAProxy)."""
        key, csr = stem + ".key", stem + ".csr"
        r = subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-keyout", key, "-subj", f"/CN={service}", "-out", csr],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise SystemExit(f"openssl req failed: {r.stderr}")
        with open(csr) as f:
            csr_pem = f.read()
        tmp = stem + ".token"
        self.join_token(service, tmp)
        with open(tmp) as f:
            tok = f.read().strip()
        ans = self.api("POST", "/v1/certificates", {"service": service, "csr": csr_pem, "join_token": tok},
                       operator=False)
        with open(stem + ".crt", "w") as f:
            f.write(ans["certificate_chain_pem"])
        with open(key) as f:
            key_pem = f.read()
        with open(stem + ".pem", "w") as f:
            f.write(ans["certificate_chain_pem"].rstrip("\n") + "\n" + key_pem)
        return ans["spiffe_id"]

    def make_certs(self):
        d = self.workdir("certs")
        server_id = self.issue(SERVICE, f"{d}/server")
        client_id = self.issue(CLIENT, f"{d}/client")
        self.certs = {"bundle": self.bundle, "server_id": server_id, "client_id": client_id,
                      "server_crt": f"{d}/server.crt", "server_key": f"{d}/server.key", "server_pem": f"{d}/server.pem",
                      "client_crt": f"{d}/client.crt", "client_key": f"{d}/client.key", "client_pem": f"{d}/client.pem"}
        harness.log(f"certificates from malla's CA: {server_id} (HAProxy B, Envoy B), {client_id} "
                    "(HAProxy A, Envoy A, the handshake client)")

    # ---- starting targets
    def start(self, pair, role, argv):
        p = self.procs.start(argv, f"{pair.dir}/{role}.log", self.cpu_proxy)
        pair.procs.append((role, p))
        return p

    def stop_pair(self, pair):
        for _, p in reversed(pair.procs):  # the client side first, so the server side drains last
            try:
                self.procs.stop(p)
            except Exception as e:  # keep stopping the others
                harness.log(f"warning: could not stop pid {p.pid}: {e}")

    def start_pair(self, name, test):
        pair = Pair(name, self.workdir(f"{name}-{test}"))
        try:
            fam = PAIRS[name][0]
            if fam.startswith("malla"):
                self.start_malla(pair)
            elif fam == "haproxy":
                self.start_haproxy(pair)
            else:
                self.start_envoy(pair)
        except BaseException:
            self.stop_pair(pair)
            raise
        return pair

    def failed(self, pair, role, why):
        return RuntimeError(f"{pair.name}: {role} {why}\n--- {pair.dir}/{role}.log ---\n"
                            f"{log_tail(f'{pair.dir}/{role}.log')}")

    def malla_server(self, pair, secured, workers):
        """The server sidecar of `pair` (role "b"), registered; returns its inbound port."""
        port, admin = harness.free_ports(2)
        tok = self.join_token(SERVICE, f"{pair.dir}/server.token")
        path = f"{pair.dir}/server.toml"
        with open(path, "w") as f:
            f.write(malla_server_toml(pair.name, workers, f"127.0.0.1:{port}", f"127.0.0.1:{self.up_h1}",
                                      f"127.0.0.1:{admin}", f"127.0.0.1:{self.cp_port}", self.bundle, tok,
                                      f"{SERVICE}-{self.seq}", secured))
        p = self.start(pair, "b", [self.a.malla_bin, "proxy", "--config", path])
        pair.info["b_admin"] = admin
        pair.info["b_port"] = port
        if not harness.wait_port(admin, p, 30):
            raise self.failed(pair, "b", "did not open its admin port")

        def registered():
            if p.poll() is not None:
                raise RuntimeError("exited")
            return msum(prom(http_get(admin, "/metrics")[1]), "malla_proxy_control_registered") >= 1
        try:
            wait_for(registered, 30, "the server sidecar did not register with the control plane")
        except RuntimeError as e:
            raise self.failed(pair, "b", str(e))
        return port

    def start_malla(self, pair):
        _, secured, workers = PAIRS[pair.name]
        b_port = self.malla_server(pair, secured, workers)
        port, admin = harness.free_ports(2)
        tok = self.join_token(CLIENT, f"{pair.dir}/client.token") if secured else None
        path = f"{pair.dir}/client.toml"
        with open(path, "w") as f:
            f.write(malla_client_toml(pair.name, workers, f"127.0.0.1:{port}", f"127.0.0.1:{admin}",
                                      f"127.0.0.1:{self.cp_port}", self.bundle, tok, f"{CLIENT}-{self.seq}",
                                      secured))
        p = self.start(pair, "a", [self.a.malla_bin, "proxy", "--config", path])
        pair.info["a_admin"] = admin
        if not harness.wait_port(admin, p, 30):
            raise self.failed(pair, "a", "did not open its admin port")

        def ready():
            if p.poll() is not None:
                raise RuntimeError("exited")
            m = prom(http_get(admin, "/metrics")[1])
            if secured and not msum(m, "malla_proxy_identity_certificate_expiry_timestamp_seconds"):
                return False
            # exactly the one server sidecar of this pair (no instance left over from another)
            if msum(m, "malla_proxy_upstream_endpoints", upstream=SERVICE) != 1:
                return False
            return f"127.0.0.1:{b_port}" in http_get(admin, "/config")[1]
        try:
            wait_for(ready, 30, f"the client sidecar did not {'get its certificate and ' if secured else ''}"
                                f"discover the server sidecar (127.0.0.1:{b_port}) alone")
        except RuntimeError as e:
            raise self.failed(pair, "a", str(e))
        ok, why = harness.wait_ready(port, "h1", p, 30)
        if not ok:
            raise self.failed(pair, "a", f"did not answer through the pair: {why}")
        pair.port = port
        st = self.pair_stats(pair)
        if secured and not st.get("handshakes"):
            raise self.failed(pair, "a", f"answered, but not over mTLS: {st}")
        if not secured and st.get("mtls_connections"):
            raise self.failed(pair, "a", f"answered over mTLS in the plaintext pair: {st}")

    def start_haproxy(self, pair):
        _, secured, _ = PAIRS[pair.name]
        port, b_port = harness.free_ports(2)
        with open(f"{pair.dir}/b.cfg", "w") as f:
            f.write(haproxy_b_cfg(b_port, self.up_h1, self.certs, secured))
        b = self.start(pair, "b", ["haproxy", "-db", "-f", f"{pair.dir}/b.cfg"])
        if not harness.wait_port(b_port, b, 30):
            raise self.failed(pair, "b", "did not open its port")
        with open(f"{pair.dir}/a.cfg", "w") as f:
            f.write(haproxy_a_cfg(pair.dir, port, b_port, self.certs, secured))
        a = self.start(pair, "a", ["haproxy", "-db", "-f", f"{pair.dir}/a.cfg"])
        pair.info["a_sock"] = f"{pair.dir}/a.sock"
        pair.info["b_port"] = b_port
        ok, why = harness.wait_ready(port, "h1", a, 30)
        if not ok:
            raise self.failed(pair, "a", f"did not answer through the pair: {why}")
        pair.port = port
        if secured and self.haproxy_group is None:
            self.haproxy_group = self.openssl_group(b_port)

    def start_envoy(self, pair):
        _, secured, _ = PAIRS[pair.name]
        port, b_port, a_admin, b_admin = harness.free_ports(4)
        with open(f"{pair.dir}/b.json", "w") as f:
            f.write(envoy_json(b_port, self.up_h1, b_admin, "up",
                               downstream_tls=envoy_server_tls(self.certs) if secured else None))
        b = self.start(pair, "b", self.envoy_argv(pair.dir, "b"))
        if not harness.wait_port(b_port, b, 30):
            raise self.failed(pair, "b", "did not open its port")
        with open(f"{pair.dir}/a.json", "w") as f:
            f.write(envoy_json(port, b_port, a_admin, "b",
                               upstream_tls=envoy_client_tls(self.certs) if secured else None))
        a = self.start(pair, "a", self.envoy_argv(pair.dir, "a"))
        pair.info.update(a_admin=a_admin, b_admin=b_admin, b_port=b_port)
        ok, why = harness.wait_ready(port, "h1", a, 30)
        if not ok:
            raise self.failed(pair, "a", f"did not answer through the pair: {why}")
        pair.port = port

    def envoy_argv(self, d, role):
        return [self.a.envoy_bin, "-c", f"{d}/{role}.json", "--concurrency", "1", "--disable-hot-restart",
                "-l", "warning", "--base-id-path", f"{d}/{role}-base-id"]

    def openssl_group(self, port):
        """The group OpenSSL's defaults agree with HAProxy B: `openssl s_client` links the
        same libssl as HAProxy A, with the same default groups."""
        c = self.certs
        try:
            r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-cert", c["client_crt"],
                                "-key", c["client_key"], "-CAfile", c["bundle"], "-brief"],
                               input="", capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            return "unknown (openssl s_client timed out)"
        out = r.stdout + r.stderr
        m = re.search(r"(?:Server Temp Key|Negotiated TLS1\.3 group):\s*([^,\n]+)", out)
        proto = re.search(r"Protocol version:\s*(\S+)", out)
        return (m.group(1).strip() if m else "unknown") + (f" ({proto.group(1)})" if proto else "")

    # ---- what a pair counted: requests through it, connections and handshakes between its sides
    def pair_stats(self, pair):
        fam, secured, _ = PAIRS[pair.name]
        st = {}
        try:
            if fam.startswith("malla"):
                a = prom(http_get(pair.info["a_admin"], "/metrics")[1])
                b = prom(http_get(pair.info["b_admin"], "/metrics")[1])
                st["requests"] = int(msum(a, "malla_proxy_responses_total"))
                out = by_labels(a, "malla_proxy_outbound_connections_by_security_total", ["security", "group"])
                inb = by_labels(b, "malla_proxy_inbound_connections_by_security_total", ["security", "group"])
                st["outbound_by_security"], st["inbound_by_security"] = out, inb
                if secured:
                    st["handshakes"] = sum(v for k, v in out.items() if k.startswith(("mtls/", "handshake-failed/")))
                    st["failed_handshakes"] = sum(v for k, v in out.items() if k.startswith("handshake-failed/"))
                else:
                    # over mTLS or not, whatever the server side counted: none is expected
                    st["mtls_connections"] = sum(v for k, v in out.items() if k.startswith("mtls/"))
                # every connection the server sidecar accepted came from the client sidecar
                st["connections"] = int(msum(b, "malla_proxy_accepted_connections_total"))
                st["groups"] = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("mtls/")}
            elif fam == "haproxy":
                rows = haproxy_stat(pair.info["a_sock"])
                fe = rows.get(("fe", "FRONTEND"), {})
                srv = rows.get(("be", "b"), {})
                st["requests"] = int(fe.get("req_tot") or 0)
                st["connections"] = int(srv.get("connect") or 0)
                st["reused"] = int(srv.get("reuse") or 0)
                if secured:
                    st["handshakes"] = st["connections"]
                    st["groups"] = {self.haproxy_group or "unknown": st["connections"]}
            else:
                a = envoy_stats(pair.info["a_admin"])
                st["requests"] = int(a.get("cluster.b.upstream_rq_total", 0))
                st["connections"] = int(a.get("cluster.b.upstream_cx_total", 0))
                if secured:
                    st["handshakes"] = int(a.get("cluster.b.ssl.handshake", 0))
                    st["failed_handshakes"] = int(a.get("cluster.b.ssl.connection_error", 0))
                    st["groups"] = {k.rsplit(".", 1)[1]: int(v) for k, v in a.items()
                                    if k.startswith("cluster.b.ssl.curves.") and v}
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            st["error"] = repr(e)
        return st

    # ---- measurements
    def settle(self, rec):
        """harness.Bench.measure's quiet-machine wait, for one measurement."""
        bg = harness.background_busy(0.4)
        if bg > 0.10 and self.quiet_budget > 0:
            harness.log(f"    {bg:.0%} of the CPU busy elsewhere; waiting for it to calm down "
                        f"({self.quiet_budget} s of waiting left for this run)")
            waited = 0
            while bg > 0.10 and self.quiet_budget > 0:
                self.quiet_budget -= 1
                waited += 1
                bg = harness.background_busy(1.0)
            harness.log(f"    waited {waited} s; {bg:.0%} busy now")
        rec["background_cpu"] = round(bg, 3)
        if bg > 0.10:
            harness.log(f"    warning: {bg:.0%} of the CPU busy before this measurement (something else is running?)")

    def infra_ticks(self):
        return sum(harness.cpu_ticks(x) for x in self.upstream_pids + self.control_pids)

    def measure(self, rnd, test, name):
        if self.control.poll() is not None:
            raise SystemExit("malla control died; see its log under " + self.run_dir)
        if test == "hs":
            return self.measure_hs(rnd, name)
        rec = {"round": rnd, "test": test, "target": name}
        pair = None if name == "direct" else self.start_pair(name, test)
        try:
            port = pair.port if pair else self.up_h1
            pids = pair.pids() if pair else []
            roles = pair.role_pids() if pair else {}
            self.settle(rec)
            if pair:
                rec["rss_idle_kib"] = sum(harness.rss_kib(x) for x in pids)
                rec["nproc"] = len(pids)
            if self.a.warmup:
                (self.wrk(port, self.a.warmup) if test == "h1" else self.oha(port, self.a.warmup, self.a.lat_rate))
            sampler = harness.RssSampler(pids) if pair else None
            if sampler:
                sampler.start()
            c0 = {r: sum(harness.cpu_ticks(x) for x in ps) for r, ps in roles.items()}
            i0, m0, o0 = self.infra_ticks(), harness.proc_cpu_jiffies(), harness.own_rusage_s()
            t0 = time.monotonic()
            r = self.wrk(port, self.a.duration) if test == "h1" else self.oha(port, self.a.duration, self.a.lat_rate)
            wall = time.monotonic() - t0
            c1 = {r_: sum(harness.cpu_ticks(x) for x in ps) for r_, ps in roles.items()}
            i1, m1, o1 = self.infra_ticks(), harness.proc_cpu_jiffies(), harness.own_rusage_s()
            used = sum(c1.values()) - sum(c0.values())
            foreign = (m1 - m0 - used - (i1 - i0)) / harness.CLK_TCK - (o1 - o0)
            rec["foreign_cpu"] = round(foreign / (wall * (os.cpu_count() or 1)), 3)
            if rec["foreign_cpu"] > 0.05:
                harness.log(f"    warning: {rec['foreign_cpu']:.0%} of the CPU went to other processes "
                            "during this measurement")
            rec["wall_s"] = wall
            if pair:
                if pair.dead():
                    raise RuntimeError(f"{name}: {', '.join(pair.dead())} exited during the measurement; "
                                       f"see {pair.dir}")
                sampler.finish()
                rec["rss_peak_kib"] = sampler.max_sum
                rec["cpu_s"] = used / harness.CLK_TCK
                rec["cpu_s_by_side"] = {r_: (c1[r_] - c0[r_]) / harness.CLK_TCK for r_ in c1}
                rec["pair"] = self.pair_stats(pair)
            rec.update(r)
        finally:
            if pair:
                self.stop_pair(pair)
        return rec

    def measure_hs(self, rnd, name):
        server, group = name.split("/")
        rec = {"round": rnd, "test": "hs", "target": name, "server": server, "group": group}
        pair = Pair(name, self.workdir(f"hs-{server}-{group}"))
        try:
            if server.startswith("malla"):
                port = self.malla_server(pair, True, 1 if server == "malla" else 0)
            elif server == "haproxy":
                (port,) = harness.free_ports(1)
                with open(f"{pair.dir}/b.cfg", "w") as f:
                    f.write(haproxy_b_cfg(port, self.up_h1, self.certs, True))
                if not harness.wait_port(port, self.start(pair, "b", ["haproxy", "-db", "-f", f"{pair.dir}/b.cfg"]), 30):
                    raise self.failed(pair, "b", "did not open its port")
            else:
                port, admin = harness.free_ports(2)
                with open(f"{pair.dir}/b.json", "w") as f:
                    f.write(envoy_json(port, self.up_h1, admin, "up", downstream_tls=envoy_server_tls(self.certs)))
                if not harness.wait_port(port, self.start(pair, "b", self.envoy_argv(pair.dir, "b")), 30):
                    raise self.failed(pair, "b", "did not open its port")
                pair.info["b_admin"] = admin
            pids = pair.pids()
            self.settle(rec)
            # OpenSSL 3.0 has no ML-KEM: HAProxy can only refuse a hybrid-only offer; a short
            # check of that replaces the measurement
            unsupported = server == "haproxy" and group == "X25519MLKEM768"
            dur = 1 if unsupported else self.a.duration
            warm = 0 if unsupported else self.a.warmup
            c = self.certs
            argv = [self.a.hs_bin, "--connect", f"127.0.0.1:{port}", "--ca", c["bundle"], "--cert", c["client_crt"],
                    "--key", c["client_key"], "--group", group, "--duration", str(dur), "--warmup", str(warm),
                    "--concurrency", str(self.a.hs_conns), "--threads", str(self.a.hs_threads)]
            c0 = sum(harness.cpu_ticks(x) for x in pids)
            i0, m0, o0 = self.infra_ticks(), harness.proc_cpu_jiffies(), harness.own_rusage_s()
            t0 = time.monotonic()
            rc, out, err = self.run_tool(argv, dur + warm + 60)
            wall = time.monotonic() - t0
            c1 = sum(harness.cpu_ticks(x) for x in pids)
            i1, m1, o1 = self.infra_ticks(), harness.proc_cpu_jiffies(), harness.own_rusage_s()
            try:
                j = json.loads(out)
            except ValueError:
                raise RuntimeError(f"malla-bench-mtls failed (rc {rc}): {out[:1000]}\n{err[:1000]}") from None
            if pair.dead():
                raise RuntimeError(f"{name}: the server exited during the measurement; see {pair.dir}")
            foreign = (m1 - m0 - (c1 - c0) - (i1 - i0)) / harness.CLK_TCK - (o1 - o0)
            rec["foreign_cpu"] = round(foreign / (wall * (os.cpu_count() or 1)), 3)
            # CPU over the whole run of the tool (warm-up included), per handshake of it all
            total = (j.get("handshakes") or 0) + (j.get("warmup_handshakes") or 0)
            rec["server_cpu_s"] = (c1 - c0) / harness.CLK_TCK
            rec["client_cpu_s"] = o1 - o0
            rec["tool_wall_s"] = wall
            rec["server_cpu_us_per_hs"] = rec["server_cpu_s"] / total * 1e6 if total else None
            rec["client_cpu_us_per_hs"] = rec["client_cpu_s"] / total * 1e6 if total else None
            rec["unsupported_expected"] = unsupported
            rec.update({k: j.get(k) for k in ("handshakes", "warmup_handshakes", "errors", "error_kinds", "seconds",
                                                "rate", "negotiated", "protocols", "concurrency", "threads")})
            rec["rps"] = j.get("rate")
            rec["hs_errors"] = rec.pop("errors")  # not request errors: reported in the handshake table
            if server.startswith("malla"):
                b = prom(http_get(pair.info["b_admin"], "/metrics")[1])
                rec["server_by_security"] = by_labels(b, "malla_proxy_inbound_connections_by_security_total",
                                                      ["security", "group", "reason"])
            elif server == "envoy":
                s = envoy_stats(pair.info["b_admin"])
                rec["server_groups"] = {k.rsplit(".", 1)[1]: int(v) for k, v in s.items()
                                        if k.startswith("listener.l.ssl.curves.") and v}
            if not unsupported and not j.get("handshakes"):
                raise RuntimeError(f"{name}: no handshake completed: {j.get('error_kinds')}")
        finally:
            self.stop_pair(pair)
        return rec


def haproxy_stat(sock_path):
    """`show stat` over HAProxy's stats socket -> {(pxname, svname): {field: value}}."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(sock_path)
        s.sendall(b"show stat\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    lines = data.decode("utf-8", "replace").splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"unexpected show stat answer: {lines[:2]}")
    head = lines[0][2:].split(",")
    out = {}
    for line in lines[1:]:
        if line:
            row = dict(zip(head, line.split(",")))
            out[(row.get("pxname"), row.get("svname"))] = row
    return out


def envoy_stats(admin):
    status, text = http_get(admin, "/stats")
    if status != 200:
        raise ValueError(f"envoy /stats answered {status}")
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


def versions(a):
    def first(argv, pat=None):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            s = (r.stdout + r.stderr).strip()
        except Exception as e:
            return f"unavailable ({e.__class__.__name__})"
        if pat:
            m = re.search(pat, s)
            return m.group(1) if m else (s.splitlines()[0] if s else "")
        return s.splitlines()[0] if s else ""
    v = {
        "nginx": first(["nginx", "-v"], r"nginx/(\S+)"),
        "haproxy": first(["haproxy", "-vv"], r"version (\S+)"),
        "haproxy_ssl": first(["haproxy", "-vv"], r"Running on OpenSSL version\s*:\s*(OpenSSL [\d.]+\w*)"),
        "envoy": first([a.envoy_bin, "--version"], r"version: \S+?/([\d.]+)/"),
        "openssl": first(["openssl", "version"], r"OpenSSL (\S+)"),
        "wrk": first(["wrk", "-v"], r"wrk (\S+)"),
        "oha": first([a.oha_bin, "--version"], r"oha (\S+)"),
        "python": platform.python_version(),
    }
    mv = first([a.malla_bin, "--version"])
    mv = mv[len("malla "):] if mv.startswith("malla ") else mv
    try:
        with open(a.malla_bin, "rb") as f:
            mv += f", sha256 {hashlib.sha256(f.read()).hexdigest()[:12]}"
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "crates"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except Exception:
        rev, dirty = "", ""
    v["malla"] = f"{mv} (git {rev or 'no commit'}{', uncommitted changes in crates/' if dirty else ''})"
    # the TLS stack of malla and of the handshake client, from Cargo.lock
    try:
        with open(os.path.join(ROOT, "Cargo.lock")) as f:
            lock = f.read()
        for crate in ("rustls", "aws-lc-rs"):
            m = re.search(rf'name = "{re.escape(crate)}"\nversion = "([^"]+)"', lock)
            if m:
                v[crate] = m.group(1)
    except OSError:
        pass
    return v


# --------------------------------------------------------------------------- measure

def measure(a):
    tests = [t for t in a.tests.split(",") if t]
    targets = [t for t in a.targets.split(",") if t]
    servers = [s for s in a.hs_servers.split(",") if s]
    for t in tests:
        if t not in TESTS:
            raise SystemExit(f"unknown test {t!r}; choose from {TESTS}")
    for t in targets:
        if t not in TARGETS:
            raise SystemExit(f"unknown target {t!r}; choose from {TARGETS}")
    for s in servers:
        if s not in HS_SERVERS:
            raise SystemExit(f"unknown handshake server {s!r}; choose from {HS_SERVERS}")
    # what harness.Bench reads from its arguments
    a.h1_duration = a.lat_duration = a.h2_duration = a.duration
    a.malla_cmd, a.malla_standin = a.malla_bin, ""
    plan = []
    for t in tests:
        names = [f"{s}/{g}" for s in servers for g in GROUPS] if t == "hs" else targets
        if names:
            plan.append((t, names))

    b = MtlsBench(a)
    harness.exit_on_signals()
    results = {
        "schema": 1,
        "bench": "mtls",
        "mode": a.mode,
        "machine": harness.machine_info(),
        "versions": versions(a),
        "params": {k: getattr(a, k) for k in ("rounds", "duration", "warmup", "wrk_conns", "lat_rate", "lat_conns",
                                              "oha_threads", "hs_conns", "hs_threads", "pin")},
        "targets": targets, "tests": tests, "hs_servers": servers, "plan": plan,
        "envoy_curves": ENVOY_CURVES,
        "failures": [],
        "runs": [],
    }
    harness.log(f"machine: {results['machine']}")
    harness.log(f"versions: {results['versions']}")
    harness.log("plan: " + "; ".join(f"{t}: {', '.join(n)}" for t, n in plan))
    t_start = time.monotonic()
    try:
        b.start_upstream()
        b.start_control()
        b.make_certs()
        results["identity"] = {"trust_domain": b.identity.get("trust_domain"), "server_id": b.certs["server_id"],
                               "client_id": b.certs["client_id"]}
        harness.run_rounds(b, a.rounds, plan, results)
        results["haproxy_group"] = b.haproxy_group
    finally:
        b.procs.stop_all()
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        results["summary"] = summarize(results)
        with open(a.out_json, "w") as f:
            json.dump(results, f, indent=1)
        harness.log(f"wrote {a.out_json}")


# --------------------------------------------------------------------------- summary

def summarize(res):
    runs = res.get("runs", [])
    by = {(r["test"], r["target"], r["round"]): r for r in runs}
    rounds = sorted({r["round"] for r in runs})
    S = report._stat
    out = {"h1": {}, "lat": {}, "hs": {}, "ratios": {}, "goals": {}}

    def val(test, t, k, key):
        r = by.get((test, t, k))
        return r.get(key) if r else None

    def per_round(test, f):
        return S([f(k) for k in rounds])

    for test in ("h1", "lat"):
        present = [t for t in res.get("targets", TARGETS) if any((test, t, k) in by for k in rounds)]
        for t in present:
            mine = [by[(test, t, k)] for k in rounds if (test, t, k) in by]
            d = {"rps": S([r.get("rps") for r in mine]), "errors": sum(r.get("errors") or 0 for r in mine)}
            if t != "direct":
                d["cpu_us_per_req"] = S([r["cpu_s"] / r["requests"] * 1e6 for r in mine
                                         if r.get("requests") and "cpu_s" in r])
                d["rss_peak_mib"] = S([r["rss_peak_kib"] / 1024 for r in mine if "rss_peak_kib" in r])
                if test == "lat":
                    d["vcpu_per_1k_rps"] = S([r["cpu_s"] / r["wall_s"] / (r["rps"] / 1000.0) for r in mine
                                              if r.get("rps") and r.get("wall_s") and "cpu_s" in r])
                hs = [(r["pair"].get("handshakes"), r["pair"].get("requests")) for r in mine if r.get("pair")]
                if any(h is not None for h, _ in hs):
                    d["handshakes"] = S([h for h, _ in hs])
                    d["handshakes_per_1k"] = S([h / q * 1000 for h, q in hs if h is not None and q])
                d["connections"] = S([r["pair"].get("connections") for r in mine if r.get("pair")])
                groups = {}
                for r in mine:
                    for g, n in (r.get("pair", {}).get("groups") or {}).items():
                        groups[g] = groups.get(g, 0) + n
                if groups:
                    d["groups"] = groups
            if test == "h1" and "direct" in present and t != "direct":
                d["vs_direct"] = per_round(test, lambda k, t=t: (val(test, t, k, "rps") / val(test, "direct", k, "rps"))
                                           if val(test, t, k, "rps") and val(test, "direct", k, "rps") else None)
            if test == "lat":
                for q in ("p50_ms", "p99_ms", "p999_ms"):
                    d[q] = S([r.get(q) for r in mine])
                    if "direct" in present and t != "direct":
                        d["added_" + q] = per_round(test, lambda k, t=t, q=q: (
                            val(test, t, k, q) - val(test, "direct", k, q))
                            if val(test, t, k, q) is not None and val(test, "direct", k, q) is not None else None)
            out[test][t] = d

    # what securing each pair costs, within each round
    for fam in FAMILIES:
        s, p = SECURED[fam], PLAIN[fam]
        r = {}
        x = per_round("h1", lambda k: (val("h1", s, k, "rps") / val("h1", p, k, "rps"))
                      if val("h1", s, k, "rps") and val("h1", p, k, "rps") else None)
        if x:
            r["h1_ratio"] = x

        def cpu_ratio(test, k):
            a_, b_ = by.get((test, s, k)), by.get((test, p, k))
            if a_ and b_ and a_.get("requests") and b_.get("requests") and a_.get("cpu_s") and b_.get("cpu_s"):
                return (a_["cpu_s"] / a_["requests"]) / (b_["cpu_s"] / b_["requests"])
            return None
        for test in ("h1", "lat"):
            x = per_round(test, lambda k, test=test: cpu_ratio(test, k))
            if x:
                r[f"{test}_cpu_ratio"] = x
        for q in ("p50_ms", "p99_ms"):
            x = per_round("lat", lambda k, q=q: (val("lat", s, k, q) - val("lat", p, k, q))
                          if val("lat", s, k, q) is not None and val("lat", p, k, q) is not None else None)
            if x:
                r[f"tls_added_{q}"] = x
        if r:
            out["ratios"][fam] = r

    # handshakes per second
    for r in runs:
        if r["test"] != "hs":
            continue
        d = out["hs"].setdefault(r["server"], {}).setdefault(r["group"], {"runs": []})
        d["runs"].append(r)
    for server, groups in out["hs"].items():
        for g, d in groups.items():
            mine = d.pop("runs")
            d["rate"] = S([r.get("rate") for r in mine])
            d["server_cpu_us_per_hs"] = S([r.get("server_cpu_us_per_hs") for r in mine])
            d["client_busy"] = S([r["client_cpu_s"] / r["tool_wall_s"] for r in mine if r.get("tool_wall_s")])
            d["errors"] = sum(r.get("hs_errors") or 0 for r in mine)
            d["handshakes"] = sum(r.get("handshakes") or 0 for r in mine)
            kinds, neg = {}, {}
            for r in mine:
                for k, n in (r.get("error_kinds") or {}).items():
                    kinds[k] = kinds.get(k, 0) + n
                for k, n in (r.get("negotiated") or {}).items():
                    neg[k] = neg.get(k, 0) + n
            d["error_kinds"], d["negotiated"] = kinds, neg
            d["unsupported"] = d["handshakes"] == 0 and d["errors"] > 0
        for_hybrid, for_x = groups.get("X25519MLKEM768"), groups.get("X25519")
        if for_hybrid and for_x and for_hybrid.get("rate") and for_x.get("rate"):
            # hybrid ÷ X25519 within each round
            pr = []
            for k in rounds:
                h = next((r.get("rate") for r in runs if r["test"] == "hs" and r["target"] == f"{server}/X25519MLKEM768"
                          and r["round"] == k), None)
                x = next((r.get("rate") for r in runs if r["test"] == "hs" and r["target"] == f"{server}/X25519"
                          and r["round"] == k), None)
                pr.append(h / x if h and x else None)
            groups["hybrid_vs_x25519"] = S(pr)

    g = out["goals"]
    rt = out["ratios"]
    hap = rt.get("haproxy", {}).get("h1_ratio")
    for fam in ("malla", "malla-default"):
        m = rt.get(fam, {}).get("h1_ratio")
        if m and hap:
            g[f"{fam}_ratio"] = {"goal": f"{NAMES[fam]}: mTLS ÷ plaintext throughput ≥ HAProxy's TLS ÷ plaintext",
                                 "measured": m["median"], "against": hap["median"],
                                 "met": m["median"] >= hap["median"]}
    params = res.get("params", {})
    for fam in ("malla", "malla-default"):
        for test in ("h1", "lat"):
            d = out[test].get(SECURED[fam], {})
            if not d.get("handshakes"):
                continue
            conns = params.get("wrk_conns" if test == "h1" else "lat_conns")
            tool = f"wrk -c{conns}" if test == "h1" else f"oha -c{conns}"
            # each worker pools the connections it opened (docs/config.md, max_idle_per_endpoint),
            # and the kernel spreads the load generator's connections over the workers anew for
            # the warm-up and the measurement: the bound is per worker
            workers = PAIRS[SECURED[fam]][2] or res.get("machine", {}).get("nproc") or 1
            bound = conns * workers
            per_worker = f" per worker, × {workers} workers" if workers > 1 else ""
            g[f"handshakes_{fam}_{test}"] = {
                "goal": f"{NAMES[fam]}: a handshake is rare under `{tool}`: no more mTLS connections than the "
                        f"load generator holds open ({conns}{per_worker})",
                "measured": d["handshakes"]["max"], "per_1k": (d.get("handshakes_per_1k") or {}).get("median"),
                "against": bound, "met": d["handshakes"]["max"] <= bound}
    return out


# --------------------------------------------------------------------------- markdown

def _groups(gs):
    if not gs:
        return "—"
    return ", ".join(f"{k}" for k, _ in sorted(gs.items(), key=lambda kv: -kv[1]))


def render(res):
    s = res.get("summary") or summarize(res)
    p, mi, ver = res["params"], res["machine"], res["versions"]
    f_ = report._f
    L = []
    a = L.append
    a(START)
    a("## mTLS between sidecars vs HAProxy and Envoy")
    a("")
    a("<!-- generated by bench/mtls/run (bench/mtls/mtls.py); edit that file, not this section -->")
    a("")
    if res.get("mode") != "full":
        a(f"> Mode `{res.get('mode')}`: short runs, {p['rounds']} round(s); numbers are a smoke test, not a result.")
        a("")
    a("What securing the hop between two proxies costs, in the same run: a **pair** is a client side (plaintext "
      "in from the load generator) calling a server side that forwards to the upstream (the nginx of `bench/run`, "
      "`200 hello\\n`), once with mutual TLS between them and once in plaintext. **malla**: a client sidecar "
      f"(outbound listener, `{SERVICE}` discovered from a `malla control` run for the benchmark) and a server sidecar "
      f"(`[inbound]`, registered as `{SERVICE}`), each joined with a join token; `mtls = \"strict\"` vs `\"off\"` on the "
      "server side (the plaintext client sidecar has no identity; the plaintext server sidecar has one, since "
      "registering over TLS takes it, but takes no mTLS). **HAProxy**: A (`server ... ssl verify required ca-file ... "
      "crt client.pem`) → B (`bind ... ssl crt server.pem ca-file ... verify required`), `nbthread 1`, "
      "`http-reuse always`. **Envoy**: A (UpstreamTlsContext with a client certificate, the server's URI SAN "
      "matched) → B (DownstreamTlsContext, `require_client_certificate`), `--concurrency 1`, "
      f"`ecdh_curves` {' then '.join(res.get('envoy_curves', ENVOY_CURVES))} on both sides. Every TLS hop is "
      "TLS 1.3 with ECDSA P-256 certificates from the one CA, malla's (HAProxy's and Envoy's keys made with openssl "
      "and certified through `POST /v1/certificates`). malla runs like for like (1 worker per sidecar) and with "
      "the worker count a user gets (one per core).")
    a("")
    a(f"Measured {mi['date']} on {mi['nproc']} × {mi['cpu_model']} ({mi['memory']}), Linux {mi['kernel']}; "
      f"malla {ver.get('malla', '?')} (rustls {ver.get('rustls', '?')}, aws-lc-rs {ver.get('aws-lc-rs', '?')}); "
      f"HAProxy {ver.get('haproxy')} ({ver.get('haproxy_ssl', 'OpenSSL')}); Envoy {ver.get('envoy')} (BoringSSL); "
      f"nginx {ver.get('nginx')}; wrk {ver.get('wrk')}, oha {ver.get('oha')}. "
      f"{p['rounds']} round(s) of {p['duration']} s per measurement (after {p['warmup']} s of warm-up), targets in "
      "an order rotated every round, each pair started fresh per measurement; medians over rounds with the range "
      "in parentheses; ratios and differences taken within each round, then the median. "
      + ("CPU layout: both sides of a pair pinned to CPU 1, load generator, upstream and control plane to CPU 0."
         if p["pin"] else "No CPU pinning: load generator, both sides of the pair and the upstream share the cores."))
    a("")
    fg = [r["foreign_cpu"] for r in res.get("runs", []) if "foreign_cpu" in r]
    if fg:
        busy = sum(1 for x in fg if x > 0.05)
        a(f"CPU taken by other processes during the measurements: median {statistics.median(fg):.1%}, "
          f"max {max(fg):.1%}" + (f" — **{busy} of {len(fg)} measurements had > 5 % of the CPU going "
                                  "elsewhere; the numbers are skewed, re-run on a quiet machine**." if busy else "."))
        a("")

    if s.get("goals"):
        a("### Against the goals")
        a("")
        a("| goal | measured | against | met |")
        a("|---|---|---|---|")
        for k, g in s["goals"].items():
            if k.endswith("_ratio"):
                a(f"| {g['goal']} | {g['measured']:.2f} (median of the per-round ratios) | HAProxy {g['against']:.2f} | "
                  f"{'yes' if g['met'] else '**no**'} |")
            else:
                per = f" ({g['per_1k']:.3f} per 1,000 requests)" if g.get("per_1k") is not None else ""
                a(f"| {g['goal']} | {g['measured']:.0f} handshakes{per} (most in a round) | ≤ {g['against']} | "
                  f"{'yes' if g['met'] else '**no**'} |")
        a("")

    rt = s.get("ratios", {})
    if rt:
        a("### What TLS costs each pair (secured ÷ plaintext, same round)")
        a("")
        a("| pair | throughput ratio (wrk) | CPU per request ratio, wrk | CPU per request ratio, "
          f"{p['lat_rate']:,} req/s | added p50 by TLS, ms | added p99 by TLS, ms |")
        a("|---|---|---|---|---|---|")
        for fam in FAMILIES:
            r = rt.get(fam)
            if r:
                a(f"| {NAMES[fam]} | {f_(r.get('h1_ratio'))} | {f_(r.get('h1_cpu_ratio'))} | "
                  f"{f_(r.get('lat_cpu_ratio'))} | {f_(r.get('tls_added_p50_ms'), sign=True)} | "
                  f"{f_(r.get('tls_added_p99_ms'), sign=True)} |")
        a("")
        a("Added by TLS: p(secured pair) − p(plaintext pair) in the same round.")
        a("")

    def hs_cells(d):
        return (f"{f_(d.get('handshakes_per_1k'), '{:.3f}')} | {f_(d.get('connections'), '{:.0f}', False)} | "
                f"{_groups(d.get('groups'))}")

    h1 = s.get("h1", {})
    if h1:
        a(f"### Throughput, HTTP/1.1 keep-alive (`wrk -t1 -c{p['wrk_conns']} -d{p['duration']}s`)")
        a("")
        a("| target | req/s | ÷ direct | pair CPU µs/request | peak RSS MiB (both) | handshakes per 1k requests | "
          "connections A→B | key exchange | errors |")
        a("|---|---|---|---|---|---|---|---|---|")
        for t in res.get("targets", TARGETS):
            d = h1.get(t)
            if not d:
                continue
            if t == "direct":
                a(f"| {NAMES[t]} | {f_(d['rps'], '{:,.0f}')} | 1.00 | — | — | — | — | — | {d['errors']} |")
                continue
            a(f"| {NAMES[t]} | {f_(d['rps'], '{:,.0f}')} | {f_(d.get('vs_direct'))} | "
              f"{f_(d.get('cpu_us_per_req'), '{:.1f}')} | {f_(d.get('rss_peak_mib'), '{:.1f}', False)} | "
              f"{hs_cells(d)} | {d['errors']} |")
        a("")

    lat = s.get("lat", {})
    if lat:
        th = f" --worker-threads {p['oha_threads']}" if p.get("oha_threads") else ""
        a(f"### Latency at a fixed {p['lat_rate']:,} req/s (`oha -q {p['lat_rate']} -c {p['lat_conns']} "
          f"-z {p['duration']}s{th}`), ms")
        a("")
        a("| target | p50 | p99 | p99.9 | added p50 | added p99 | pair vCPU per 1k req/s | pair CPU µs/request | "
          "handshakes per 1k requests | errors |")
        a("|---|---|---|---|---|---|---|---|---|---|")
        for t in res.get("targets", TARGETS):
            d = lat.get(t)
            if not d:
                continue
            a(f"| {NAMES[t]} | {f_(d['p50_ms'], '{:.3f}', False)} | {f_(d['p99_ms'], '{:.3f}', False)} | "
              f"{f_(d['p999_ms'], '{:.3f}', False)} | {f_(d.get('added_p50_ms'), sign=True)} | "
              f"{f_(d.get('added_p99_ms'), sign=True)} | {f_(d.get('vcpu_per_1k_rps'), '{:.3f}', False)} | "
              f"{f_(d.get('cpu_us_per_req'), '{:.1f}')} | {f_(d.get('handshakes_per_1k'), '{:.3f}')} | "
              f"{d['errors']} |")
        a("")
        a("Added: target − direct in the same round (the whole pair's cost: two proxies and a hop).")
        a("")

    a("Pair CPU: utime + stime of every process of both sides (`/proc/PID/stat`) during the measurement ÷ the "
      "requests completed. Handshakes per 1k requests: over each pair's whole life (probe, warm-up and "
      "measurement), TLS connections the client side opened to the server side ÷ requests it forwarded: malla's "
      "`malla_proxy_outbound_connections_by_security_total{security=\"mtls\"|\"handshake-failed\"}` ÷ "
      "`malla_proxy_responses_total` of the client sidecar; Envoy A's `cluster.b.ssl.handshake` ÷ "
      "`cluster.b.upstream_rq_total`; HAProxy A's backend server `connect` ÷ its frontend's `req_tot` (`show stat`). "
      "Connections A→B: the connections the client side opened to the server side, for the plaintext pairs too "
      "(malla: the server sidecar's `malla_proxy_accepted_connections_total`; Envoy A: `cluster.b.upstream_cx_total`; "
      "HAProxy A: `connect`). Key exchange: malla's "
      "from the `group` label of those metrics, Envoy's from `cluster.b.ssl.curves.*`, HAProxy's from "
      f"`openssl s_client` against B with the same OpenSSL defaults as HAProxy A ({res.get('haproxy_group') or '—'}).")
    a("")

    hs = s.get("hs", {})
    if hs:
        a(f"### New TLS 1.3 connections per second (handshakes), by key exchange")
        a("")
        a(f"`malla-bench-mtls` (bench/mtls/src/main.rs: rustls {ver.get('rustls', '?')} on aws-lc-rs, {p['hs_threads']} "
          f"thread(s), {p['hs_conns']} connections in flight) opens new connections to each server side alone, "
          "presenting a client certificate, offering exactly one group: X25519MLKEM768 (hybrid post-quantum) or "
          "X25519. Every connection is a full handshake (no resumption) followed by `close_notify` and a read to the "
          "server's close, so the server has verified the client certificate before it counts. Server CPU per "
          "handshake: the server process's utime + stime over the tool's whole run ÷ the handshakes of that run; "
          "client busy: the tool's CPU ÷ wall time (1.00 per thread = the client was the limit).")
        a("")
        a("| server | key exchange offered | handshakes/s | hybrid ÷ X25519 | server CPU µs/handshake | client busy | "
          "agreed | errors |")
        a("|---|---|---|---|---|---|---|---|")
        for server in HS_SERVERS:
            groups = hs.get(server)
            if not groups:
                continue
            for gname in GROUPS:
                d = groups.get(gname)
                if not d:
                    continue
                if d.get("unsupported"):
                    why = ", ".join(sorted(d["error_kinds"])) or "refused"
                    a(f"| {HS_NAMES[server]} | {gname} | not supported: every handshake refused ({why}) | — | — | — | "
                      f"— | {d['errors']} |")
                    continue
                ratio = f_(groups.get("hybrid_vs_x25519")) if gname == "X25519MLKEM768" else ""
                a(f"| {HS_NAMES[server]} | {gname} | {f_(d['rate'], '{:,.0f}')} | {ratio} | "
                  f"{f_(d.get('server_cpu_us_per_hs'), '{:.0f}')} | {f_(d.get('client_busy'), '{:.2f}', False)} | "
                  f"{_groups(d.get('negotiated'))} | {d['errors']} |")
        a("")
        if "haproxy" in hs:
            a(f"HAProxy runs on {ver.get('haproxy_ssl', 'OpenSSL')}, which has no ML-KEM: offered the hybrid alone it "
              "can only refuse (checked for 1 s per round instead of measured); HAProxy A, with OpenSSL's default groups, "
              "agrees on X25519 with B.")
            a("")

    report.failures_section(res, a)
    a("Reproduce: `bench/mtls/run" + ("" if res.get("mode") == "full" else " --quick")
      + "` (see bench/README.md). " f"The whole run took {res.get('elapsed_s', 0) / 60:.1f} min.")
    a(END)
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="run the benchmark, write the results JSON")
    m.add_argument("--targets", default=",".join(TARGETS))
    m.add_argument("--tests", default=",".join(TESTS))
    m.add_argument("--hs-servers", default=",".join(HS_SERVERS))
    m.add_argument("--rounds", type=int, default=3)
    m.add_argument("--duration", type=int, default=10, help="seconds per measurement, every test")
    m.add_argument("--warmup", type=int, default=1, help="seconds of load before each measurement (0: none)")
    # the same load as bench/run (harness.py's defaults)
    m.add_argument("--wrk-conns", type=int, default=50)
    m.add_argument("--lat-rate", type=int, default=2000)
    m.add_argument("--lat-conns", type=int, default=16)
    m.add_argument("--oha-threads", type=int, default=1)
    m.add_argument("--oha-bin", default="oha")
    m.add_argument("--hs-conns", type=int, default=16, help="handshake client: connections in flight")
    m.add_argument("--hs-threads", type=int, default=1, help="handshake client: threads")
    m.add_argument("--pin", action="store_true")
    m.add_argument("--quiet-wait", type=int, default=120,
                   help="seconds, over the whole run, to wait for other CPU use to stop before a measurement")
    m.add_argument("--mode", default="full")
    m.add_argument("--malla-bin", required=True)
    m.add_argument("--hs-bin", required=True)
    m.add_argument("--envoy-bin", required=True)
    m.add_argument("--out-json", required=True)
    m.add_argument("--run-dir", required=True)
    m.add_argument("--pidfile", required=True)
    r = sub.add_parser("report", help="print the markdown section of a results JSON")
    r.add_argument("results")
    r.add_argument("--md", help="write the section to this file")
    r.add_argument("--docs", help="replace the section between the mtls markers in this file "
                                  "(appended at its end when absent)")
    r.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    if a.cmd == "measure":
        measure(a)
        return
    with open(a.results) as f:
        res = json.load(f)
    res["summary"] = summarize(res)  # recompute: the rules here may be newer than the file
    sec = render(res)
    if a.md:
        with open(a.md, "w") as f:
            f.write(sec)
    if a.docs:
        report.update_docs(a.docs, sec, START, END)
    if not a.quiet:
        sys.stdout.write(sec)


if __name__ == "__main__":
    main()
