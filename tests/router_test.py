#!/usr/bin/env python3
"""`larder router` against fake instances (Python http.server threads standing in for `larder serve`
with roles prefill/decode), then against a real `larder serve`, then with --cluster against its own etcd.

1. Fakes: each generation request reaches a decode instance with X-Larder-Prefill naming a prefill
   instance (round-robin over two of each, separately); no prefill instance -> no header; a stream passes
   through chunk by chunk (the fake holds its last chunk until the test has seen the first); a client that
   disconnects mid-stream makes the router close the upstream connection; an unreachable decode instance
   is skipped, none reachable -> 503 OpenAI-style JSON; --api-key (401, forwarded upstream); /health,
   /metrics, /v1/models, 404, 405, 413; SIGTERM exits 0.
2. A real `larder serve` (stories260K from the shared data, --port 0): a greedy completion through the
   router equals the one sent directly (plain and streamed).
3. etcd (when /usr/bin/etcd is installed): two fake instances registered by writing their JSON with
   etcdctl are discovered; one with another model fingerprint is left out (one stderr line); deleting
   the decode instance's key takes it out of /health.

Environment: LARDER_BIN (the larder binary), LARDER_SHARED (default ../shared beside the repository).
The real-model part is skipped (one line) when the shared model is missing, the etcd part when etcd is.
"""
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.environ.get("LARDER_SOURCE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SHARED = os.environ.get("LARDER_SHARED") or os.path.join(ROOT, "..", "shared")
MODEL = os.path.join(SHARED, "models", "stories260K", "stories260K-f32.gguf")
BIN = os.environ.get("LARDER_BIN") or os.path.join(ROOT, "build", "bin", "larder")
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"
T_START = time.time()

failures = []
passed = 0


def log(msg):
    print(f"[{time.time() - T_START:6.1f}s] {msg}", flush=True)


def check(cond, what):
    global passed
    if cond:
        passed += 1
    else:
        failures.append(what)
        log(f"FAIL: {what}")
    return cond


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def req(port, method, path, body=None, headers=None, timeout=30):
    """One HTTP request; returns (status, headers dict (lower-case), body bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


def is_openai_error(body, code=None):
    try:
        j = json.loads(body)
    except ValueError:
        return False
    e = j.get("error") if isinstance(j, dict) else None
    ok = (isinstance(e, dict) and isinstance(e.get("message"), str) and e["message"] != "" and
          isinstance(e.get("type"), str) and "code" in e)
    return ok and (code is None or e.get("code") == code)


def metrics(port):
    st, _, body = req(port, "GET", "/metrics", timeout=5)
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return st, out


# ---------------------------------------------------------------------------------------------
# A fake instance


class Fake:
    """An HTTP server in a thread answering like a Larder instance and recording what it got.

    POST bodies may carry "x_test": {"status": N, "chunks": N, "delay": S, "gate": bool} to shape the answer;
    with "stream": true it answers SSE with chunked encoding (one event per chunk)."""

    def __init__(self, name):
        self.name = name
        self.requests = []  # (method, path, headers (lower-case keys), body)
        self.lock = threading.Lock()
        self.gate = threading.Event()      # a gated stream holds its last event until this is set
        self.sent = []                     # indices of the stream events written so far
        self.aborted = threading.Event()   # a stream write failed: the router closed the connection
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _record(self, body):
                with fake.lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    fake.requests.append((self.command, self.path, headers, body))

            def do_GET(self):
                self._record(None)
                if self.path.startswith("/v1/models"):
                    self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model",
                                                                  "owned_by": fake.name}]})
                else:
                    self._json(404, {"error": {"message": "nope", "type": "invalid_request_error", "code": None}})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                self._record(body)
                xt = body.get("x_test") or {}
                if body.get("stream"):
                    self._stream(xt)
                    return
                status = xt.get("status", 200)
                if status != 200:
                    self._json(status, {"error": {"message": "fake says no", "type": "invalid_request_error",
                                                  "code": "fake_error"}})
                    return
                self._json(200, {"id": "cmpl-fake", "object": "text_completion", "served_by": fake.name,
                                 "path": self.path, "choices": [{"index": 0, "text": f"hello from {fake.name}",
                                                                  "finish_reason": "stop"}]})

            def _json(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Fake-Name", fake.name)
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, xt):
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunks, delay = xt.get("chunks", 3), xt.get("delay", 0.0)
                try:
                    for i in range(chunks):
                        if i == chunks - 1 and xt.get("gate"):
                            fake.gate.wait(15)
                        self._chunk(f"data: {json.dumps({'i': i, 'from': fake.name})}\n\n".encode())
                        with fake.lock:
                            fake.sent.append(i)
                        if delay:
                            time.sleep(delay)
                    self._chunk(b"data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    fake.aborted.set()

            def _chunk(self, data):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.addr = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def posts(self):
        with self.lock:
            return [r for r in self.requests if r[0] == "POST"]

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.sent.clear()
        self.gate.clear()
        self.aborted.clear()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------
# Processes


class Proc:
    """`larder router` or `larder serve` with --port 0; the chosen port is read from stderr."""

    def __init__(self, args, name):
        self.name = name
        self.lines = []
        self.port = None
        self.proc = subprocess.Popen([BIN] + args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        t0 = time.time()
        while self.port is None and time.time() - t0 < 30 and self.proc.poll() is None:
            time.sleep(0.02)
        if self.port is None:
            self.kill()
            raise RuntimeError(f"{name} did not start: {''.join(self.lines)}")

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))

    def stderr(self):
        return "".join(self.lines)

    def wait_health(self, want=200, timeout=30):
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                st, _, body = req(self.port, "GET", "/health", timeout=2)
                if st == want:
                    return json.loads(body)
            except OSError:
                pass
            time.sleep(0.05)
        return None

    def term(self, timeout=10):
        """SIGTERM; returns the exit code (None when it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def router(args, name="router"):
    return Proc(["router", "--host", "127.0.0.1", "--port", "0"] + args, name)


# ---------------------------------------------------------------------------------------------
# 1. Fakes


def test_fakes():
    d1, d2, p1, p2 = Fake("d1"), Fake("d2"), Fake("p1"), Fake("p2")
    r = router(["--decode", f"{d1.addr},{d2.addr}", "--prefill", f"{p1.addr},{p2.addr}"])
    try:
        h = r.wait_health(200, timeout=10)
        check(h is not None and h.get("prefill") == 2 and h.get("decode") == 2 and h.get("etcd") == "off",
              f"/health counts the instances: {h}")

        # Round-robin: decode and prefill each alternate; the prefill instances never see the request.
        seen = []
        for i in range(4):
            path = "/v1/completions" if i % 2 == 0 else "/v1/chat/completions"
            st, hd, body = req(r.port, "POST", path, {"prompt": f"p{i}", "max_tokens": 4})
            j = json.loads(body) if st == 200 else {}
            check(st == 200 and hd.get("content-type") == "application/json" and j.get("path") == path,
                  f"request {i} relayed: {st} {hd.get('content-type')} {body[:200]!r}")
            check(hd.get("x-fake-name") == j.get("served_by"), f"upstream headers passed through: {hd}")
            seen.append(j.get("served_by"))
        check(seen in (["d1", "d2", "d1", "d2"], ["d2", "d1", "d2", "d1"]), f"decode round-robin: {seen}")
        got = [(rq[3].get("prompt"), rq[2].get("x-larder-prefill")) for f in (d1, d2) for rq in f.posts()]
        got.sort()
        pf = [g[1] for g in got]
        check(len(got) == 4 and pf[0] != pf[1] and pf[0] == pf[2] and pf[1] == pf[3] and
              set(pf) == {p1.addr, p2.addr}, f"X-Larder-Prefill alternates over both prefill instances: {got}")
        check(not p1.posts() and not p2.posts(), "prefill instances get no request from the router")
        body0 = d1.posts()[0][3] if d1.posts() else {}
        check(body0.get("max_tokens") == 4, f"the body reaches the instance as sent: {body0}")

        # An instance's error answer passes through as it is.
        st, _, body = req(r.port, "POST", "/v1/completions", {"prompt": "x", "x_test": {"status": 400}})
        check(st == 400 and is_openai_error(body, "fake_error"), f"upstream 400 passed through: {st} {body[:200]!r}")

        # Streaming, chunk by chunk: the first event arrives while the fake still holds its last one.
        for f in (d1, d2):
            f.reset()
        c = http.client.HTTPConnection("127.0.0.1", r.port, timeout=20)
        c.request("POST", "/v1/completions", body=json.dumps({"prompt": "s", "stream": True,
                                                              "x_test": {"chunks": 4, "gate": True}}),
                  headers={"Content-Type": "application/json"})
        resp = c.getresponse()
        check(resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream",
              f"stream status and type: {resp.status} {resp.getheader('Content-Type')}")
        first = b""
        while not first.startswith(b"data:"):
            first = resp.readline()
            if not first:
                break
        streamer = d1 if d1.posts() else d2
        with streamer.lock:
            sent_before = list(streamer.sent)
        check(first.startswith(b"data: ") and json.loads(first[6:]).get("i") == 0 and 3 not in sent_before,
              f"first event seen before the last was sent: {first!r}, sent {sent_before}")
        streamer.gate.set()
        rest = resp.read()
        c.close()
        events = [first.strip()] + [ln for ln in rest.split(b"\n") if ln.startswith(b"data:")]
        idx = [json.loads(e[6:]).get("i") for e in events if e != b"data: [DONE]"]
        check(idx == [0, 1, 2, 3] and events[-1] == b"data: [DONE]", f"every event in order, then [DONE]: {events}")

        # A client that goes away mid-stream: the router closes the upstream connection.
        for f in (d1, d2):
            f.reset()
        s = socket.create_connection(("127.0.0.1", r.port), timeout=10)
        payload = json.dumps({"prompt": "s", "stream": True, "x_test": {"chunks": 100, "delay": 0.1}}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        buf = b""
        while b"data:" not in buf:
            part = s.recv(4096)
            if not part:
                break
            buf += part
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        t0 = time.time()
        streamer = d1 if d1.posts() else d2
        aborted = streamer.aborted.wait(5)
        with streamer.lock:
            n_sent = len(streamer.sent)
        check(aborted and n_sent < 60, f"upstream closed after the client left ({time.time() - t0:.1f}s, "
                                       f"{n_sent} events sent)")
        t0 = time.time()
        while time.time() - t0 < 5:
            _, m = metrics(r.port)
            if m.get("larder_router_requests_in_flight") == 0:
                break
            time.sleep(0.05)
        check(m.get("larder_router_requests_in_flight") == 0, f"nothing left in flight: {m}")

        # GET /v1/models comes from a decode instance.
        st, _, body = req(r.port, "GET", "/v1/models")
        j = json.loads(body) if st == 200 else {}
        check(st == 200 and j.get("data", [{}])[0].get("id") == "fake-model", f"/v1/models relayed: {st} {body!r}")

        # Errors of the router itself: 404, 405, 413 as OpenAI JSON.
        st, _, body = req(r.port, "GET", "/nope")
        check(st == 404 and is_openai_error(body, "unknown_url"), f"404: {st} {body!r}")
        st, _, body = req(r.port, "GET", "/v1/completions")
        check(st == 405 and is_openai_error(body, "method_not_allowed"), f"405: {st} {body!r}")
        st, _, body = req(r.port, "POST", "/v1/completions", b"{\"prompt\":\"" + b"a" * (9 << 20) + b"\"}")
        check(st == 413 and is_openai_error(body, "request_too_large"), f"413: {st} {body[:200]!r}")

        st, m = metrics(r.port)
        check(st == 200 and m.get('larder_router_requests_total{status="200"}', 0) >= 6 and
              m.get('larder_router_requests_total{status="404"}') == 1 and
              m.get('larder_router_instances{role="prefill"}') == 2 and
              m.get('larder_router_instances{role="decode"}') == 2 and
              m.get("larder_router_etcd_up") == 0 and m.get("larder_router_upstream_errors_total") == 0,
              f"/metrics: {m}")
        # SIGTERM while a stream is in flight: it completes, then the router exits 0.
        for f in (d1, d2):
            f.reset()
        c = http.client.HTTPConnection("127.0.0.1", r.port, timeout=20)
        c.request("POST", "/v1/completions", body=json.dumps({"prompt": "t", "stream": True,
                                                              "x_test": {"chunks": 6, "delay": 0.2}}),
                  headers={"Content-Type": "application/json"})
        resp = c.getresponse()
        first = resp.readline()
        r.proc.send_signal(signal.SIGTERM)
        rest = resp.read()
        c.close()
        n_events = (first + rest).count(b"data: {")
        check(n_events == 6 and rest.rstrip().endswith(b"data: [DONE]"), f"SIGTERM: the stream completes: {rest!r}")
        rc = r.term()
        check(rc == 0 and "stopped" in r.stderr(), f"SIGTERM: exit {rc}: {r.stderr()[-300:]}")
    finally:
        r.kill()

    # Only decode instances: no X-Larder-Prefill; a dead one is skipped; --api-key is checked and forwarded.
    dead = free_port()
    for f in (d1, d2):
        f.reset()
    r = router(["--decode", f"127.0.0.1:{dead},{d1.addr}", "--api-key", "sekret"])
    try:
        key = {"Authorization": "Bearer sekret"}
        for i in range(4):
            st, _, body = req(r.port, "POST", "/v1/completions", {"prompt": f"k{i}"}, headers=key)
            check(st == 200 and json.loads(body).get("served_by") == "d1",
                  f"dead instance skipped ({i}): {st} {body!r}")
        hdrs = [rq[2] for rq in d1.posts()]
        check(len(hdrs) == 4 and all("x-larder-prefill" not in h for h in hdrs), "no prefill instance: no header")
        check(all(h.get("authorization") == "Bearer sekret" for h in hdrs), "the API key is forwarded upstream")
        st, _, body = req(r.port, "POST", "/v1/completions", {"prompt": "x"})
        check(st == 401 and is_openai_error(body, "invalid_api_key"), f"no key -> 401: {st} {body!r}")
        st, _, body = req(r.port, "POST", "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer no"})
        check(st == 401 and is_openai_error(body, "invalid_api_key"), f"wrong key -> 401: {st} {body!r}")
        st, _, _ = req(r.port, "GET", "/v1/models")
        check(st == 401, f"/v1/models needs the key: {st}")
        st, _, _ = req(r.port, "GET", "/health")
        check(st == 200, f"/health needs no key: {st}")
        _, m = metrics(r.port)
        check(m.get("larder_router_upstream_errors_total", 0) >= 2, f"upstream errors counted: {m}")
    finally:
        r.kill()

    # No decode instance reachable -> 503 with an OpenAI error.
    r = router(["--decode", f"127.0.0.1:{dead},127.0.0.1:{free_port()}"])
    try:
        st, hd, body = req(r.port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        check(st == 503 and is_openai_error(body, "upstream_unavailable") and
              hd.get("content-type") == "application/json", f"none reachable -> 503: {st} {body!r}")
        st, _, body = req(r.port, "POST", "/v1/completions", {"prompt": "x", "stream": True})
        check(st == 503 and is_openai_error(body), f"a stream too -> 503: {st} {body!r}")
    finally:
        r.kill()

    # --cluster with nothing registered (here: no etcd at all) -> no decode instance: /health 503.
    r = router(["--cluster", f"etcd://127.0.0.1:{free_port()}"])
    try:
        st, _, body = req(r.port, "GET", "/health")
        check(st == 503 and json.loads(body).get("decode") == 0 and json.loads(body).get("etcd") == "down",
              f"/health without decode instance: {st} {body!r}")
        st, _, body = req(r.port, "POST", "/v1/completions", {"prompt": "x"})
        check(st == 503 and is_openai_error(body, "no_decode_instance"), f"no decode instance -> 503: {st} {body!r}")
    finally:
        r.kill()

    # Bad arguments fail at once with one line.
    p = subprocess.run([BIN, "router", "--port", "0", "--decode", "nohost"], capture_output=True, text=True,
                       timeout=30)
    check(p.returncode != 0 and "--decode" in p.stderr, f"bad --decode rejected: {p.returncode} {p.stderr!r}")
    p = subprocess.run([BIN, "router", "--port", "0", "--cluster", "http://x:1"], capture_output=True, text=True,
                       timeout=30)
    check(p.returncode != 0 and "--cluster" in p.stderr, f"bad --cluster rejected: {p.returncode} {p.stderr!r}")
    for f in (d1, d2, p1, p2):
        f.close()


# ---------------------------------------------------------------------------------------------
# 2. A real instance


def test_real_serve():
    if not os.path.exists(MODEL):
        log(f"SKIP real larder serve: {MODEL} not found")
        return
    srv = Proc(["serve", "-m", MODEL, "--host", "127.0.0.1", "--port", "0", "-t", "1", "--parallel", "2"], "serve")
    r = None
    try:
        check(srv.wait_health(200, timeout=60) is not None, f"serve ready: {srv.stderr()[-300:]}")
        r = router(["--decode", f"127.0.0.1:{srv.port}"])
        body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
        st1, _, direct = req(srv.port, "POST", "/v1/completions", body)
        st2, _, routed = req(r.port, "POST", "/v1/completions", body)
        t1 = json.loads(direct)["choices"][0]["text"] if st1 == 200 else None
        t2 = json.loads(routed)["choices"][0]["text"] if st2 == 200 else None
        check(st1 == 200 and st2 == 200 and t1 and t1 == t2,
              f"greedy completion via router == direct: {t1!r} vs {t2!r}")
        st, hd, data = req(r.port, "POST", "/v1/completions", dict(body, stream=True))
        text = ""
        for ln in data.split(b"\n"):
            if ln.startswith(b"data: {"):
                text += json.loads(ln[6:])["choices"][0]["text"]
        check(st == 200 and hd.get("content-type") == "text/event-stream" and text == t1 and
              data.rstrip().endswith(b"data: [DONE]"), f"streamed via router == direct: {text!r}")
        st, _, data = req(r.port, "GET", "/v1/models")
        check(st == 200 and json.loads(data)["data"][0]["id"] == "stories260K-f32", f"/v1/models: {data!r}")
    finally:
        if r:
            r.kill()
        srv.kill()


# ---------------------------------------------------------------------------------------------
# 3. Discovery through etcd


def test_etcd():
    if not os.access(ETCD, os.X_OK) or not os.access(ETCDCTL, os.X_OK):
        log(f"SKIP etcd discovery: {ETCD} / {ETCDCTL} not installed (Debian: etcd-server, etcd-client)")
        return
    tmp = tempfile.mkdtemp(prefix="larder-router-etcd-")
    cp, pp = free_port(), free_port()
    client, peer = f"http://127.0.0.1:{cp}", f"http://127.0.0.1:{pp}"
    etcd = subprocess.Popen([ETCD, "--data-dir", os.path.join(tmp, "data"), "--listen-client-urls", client,
                             "--advertise-client-urls", client, "--listen-peer-urls", peer,
                             "--initial-advertise-peer-urls", peer, "--initial-cluster", f"default={peer}",
                             "--name", "default"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, ETCDCTL_API="3")

    def ctl(*args):
        return subprocess.run([ETCDCTL, "--endpoints", client] + list(args), env=env, capture_output=True, text=True,
                              timeout=10)

    fakes, r = [], None
    try:
        t0 = time.time()
        while time.time() - t0 < 20 and ctl("endpoint", "health").returncode != 0:
            time.sleep(0.2)
        dec, pre, other = Fake("reg-decode"), Fake("reg-prefill"), Fake("reg-other")
        fakes = [dec, pre, other]

        def info(iid, role, fake, model="fp-stories"):
            return json.dumps({"id": iid, "role": role, "model": model, "kv_layout": "kv-1",
                               "api_address": fake.addr, "transfer_address": "", "capacity": {"kv_blocks": 64},
                               "load": {"running": 0}, "updated_ms": int(time.time() * 1000)})

        for iid, role, fake, model in (("a-decode", "decode", dec, "fp-stories"),
                                       ("b-prefill", "prefill", pre, "fp-stories"),
                                       ("c-other", "decode", other, "fp-different")):
            p = ctl("put", f"/larder/rt/instances/{iid}", info(iid, role, fake, model))
            check(p.returncode == 0, f"etcdctl put {iid}: {p.stderr}")
        ctl("put", "/larder/rt/instances/zz-garbage", "{oops")
        r = router(["--cluster", f"etcd://127.0.0.1:{cp}", "--cluster-name", "rt"])
        h = r.wait_health(200, timeout=10)
        check(h is not None and h.get("decode") == 1 and h.get("prefill") == 1 and h.get("etcd") == "up",
              f"registered instances discovered: {h}")
        for i in range(3):
            st, _, body = req(r.port, "POST", "/v1/completions", {"prompt": f"e{i}"})
            check(st == 200 and json.loads(body).get("served_by") == "reg-decode", f"to the decode instance: {body!r}")
        hdrs = [rq[2] for rq in dec.posts()]
        check(len(hdrs) == 3 and all(h.get("x-larder-prefill") == pre.addr for h in hdrs),
              f"X-Larder-Prefill names the registered prefill instance: {hdrs}")
        check(not other.posts() and not pre.posts(), "the other model's instance is left out")
        err = r.stderr()
        check(err.count("skipping instance c-other") == 1 and "fp-different" in err,
              f"one stderr line for the other model: {err!r}")
        check("zz-garbage" in err, f"a garbage registration is reported, not fatal: {err!r}")
        _, m = metrics(r.port)
        check(m.get("larder_router_etcd_up") == 1 and m.get('larder_router_instances{role="decode"}') == 1,
              f"/metrics with etcd: {m}")
        # The first registered decode instance sets the model: with a-decode gone, c-other's model
        # rules and the prefill instance (another model now) is left out.
        ctl("del", "/larder/rt/instances/a-decode")
        t0 = time.time()
        while time.time() - t0 < 5:
            st, _, body = req(r.port, "POST", "/v1/completions", {"prompt": "after"})
            if st == 200 and json.loads(body).get("served_by") == "reg-other":
                break
            time.sleep(0.1)
        check(st == 200 and json.loads(body).get("served_by") == "reg-other" and
              "x-larder-prefill" not in other.posts()[-1][2], f"a deleted registration leaves: {body!r}")
        ctl("del", "/larder/rt/instances/c-other")
        h = r.wait_health(503, timeout=5)
        check(h is not None and h.get("decode") == 0 and h.get("prefill") == 1, f"no decode instance left: {h}")
    finally:
        if r:
            r.kill()
        for f in fakes:
            f.close()
        etcd.kill()
        etcd.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    if not os.access(BIN, os.X_OK):
        print(f"SKIP: {BIN} not found (set LARDER_BIN)")
        return 77
    for t in (test_fakes, test_real_serve, test_etcd):
        log(t.__name__)
        try:
            t()
        except Exception as e:  # a crash in one part should not hide the others
            check(False, f"{t.__name__} raised {type(e).__name__}: {e}")
    log(f"{passed} checks passed, {len(failures)} failed")
    for f in failures:
        print(f"  FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
