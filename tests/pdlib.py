"""Helpers of the P/D tests (pd_test.py, e2e_pd_netns_test.py, bench/pd_bench.py): processes of
`larder serve` / `larder router` / etcd, HTTP requests and /metrics."""

import http.client
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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.environ.get("LARDER_SOURCE_DIR") or os.path.dirname(HERE)


def larder_bin():
    b = os.environ.get("LARDER_BIN")
    if b:
        return b
    p = os.path.join(REPO, "build", "bin", "larder")
    if os.path.exists(p):
        return p
    sys.exit("LARDER_BIN is not set and no build/bin/larder was found")


def model_path(name):
    r = subprocess.run([os.path.join(REPO, "scripts", "models"), "--path", name], capture_output=True, text=True)
    p = r.stdout.strip()
    return p if r.returncode == 0 and p and os.path.exists(p) else None


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Proc:
    """A larder process whose stderr is collected; `pattern` (a regex with one group: the port) is
    waited for. `prefix` runs it under another command (ip netns exec NS, taskset)."""

    def __init__(self, args, name, pattern=r"listening on http://[^:]+:(\d+)", prefix=(), env=None, timeout=60):
        self.name = name
        self.lines = []
        self.port = None
        self.pattern = re.compile(pattern)
        self.proc = subprocess.Popen(list(prefix) + args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        t0 = time.time()
        while self.port is None and time.time() - t0 < timeout and self.proc.poll() is None:
            time.sleep(0.02)
        if self.port is None:
            self.kill()
            raise RuntimeError("%s did not start: %s" % (name, "".join(self.lines)[-2000:]))

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = self.pattern.search(line)
            if m and self.port is None:
                self.port = int(m.group(1))

    def text(self):
        return "".join(self.lines)

    def alive(self):
        return self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def serve(model, extra, name, host="127.0.0.1", prefix=(), env=None, threads="2"):
    p = Proc([larder_bin(), "serve", "-m", model, "--host", host, "--port", "0", "-t", threads] + list(extra), name,
             prefix=prefix, env=env)
    p.host = host
    wait_ready(p)
    return p


def router(extra, name, host="127.0.0.1", prefix=(), env=None):
    p = Proc([larder_bin(), "router", "--host", host, "--port", "0"] + list(extra), name,
             pattern=r"larder router: listening on http://[^:]+:(\d+)", prefix=prefix, env=env)
    p.host = host
    return p


def req(host, port, method, path, body=None, headers=None, timeout=120):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
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


def wait_ready(p, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            st, _, _ = req(p.host, p.port, "GET", "/health", timeout=2)
            if st == 200:
                return
        except OSError:
            pass
        if not p.alive():
            break
        time.sleep(0.05)
    raise RuntimeError("%s: /health never became 200: %s" % (p.name, p.text()[-2000:]))


def metrics(p):
    st, _, body = req(p.host, p.port, "GET", "/metrics", timeout=5)
    assert st == 200, st
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def complete(host, port, prompt, n=16, headers=None, extra=None, timeout=300):
    """A greedy /v1/completions call; prompt is token ids or text. Returns (status, json)."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "logprobs": 1}
    body.update(extra or {})
    st, _, data = req(host, port, "POST", "/v1/completions", body, headers=headers, timeout=timeout)
    try:
        return st, json.loads(data)
    except ValueError:
        return st, {"raw": data.decode(errors="replace")}


def tokens_of(j):
    """The generated token ids of a completion with logprobs (tokens are text pieces; their
    concatenation with the logprobs is what the comparison needs)."""
    lp = j["choices"][0].get("logprobs") or {}
    return lp.get("tokens"), j["choices"][0]["text"]


class Etcd:
    """Its own etcd on free ports in a temporary directory (CI installs etcd-server)."""

    def __init__(self, host="127.0.0.1", prefix=(), port=None, peer_port=None, data_dir=None):
        self.host = host
        self.port = port or free_port()
        self.peer_port = peer_port or free_port()
        self.prefix = prefix
        self.dir = data_dir or tempfile.mkdtemp(prefix="larder-etcd-")
        self.start()

    def start(self):
        c = "http://%s:%d" % (self.host, self.port)
        pe = "http://%s:%d" % (self.host, self.peer_port)
        self.proc = subprocess.Popen(list(self.prefix) + [
            "etcd", "--name", "default", "--data-dir", self.dir, "--listen-client-urls", c, "--advertise-client-urls", c,
            "--listen-peer-urls", pe, "--initial-advertise-peer-urls", pe, "--initial-cluster", "default=" + pe],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while time.time() - t0 < 20:
            try:
                st, _, _ = req(self.host, self.port, "GET", "/health", timeout=1)
                if st == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd did not start")

    def url(self):
        return "etcd://%s:%d" % (self.host, self.port)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def instances(self, cluster):
        """{id: value} of the registered instances (through etcdctl, independent of Larder's client)."""
        env = dict(os.environ, ETCDCTL_API="3")
        r = subprocess.run(list(self.prefix) + ["etcdctl", "--endpoints", "http://%s:%d" % (self.host, self.port), "get",
                            "--prefix", "/larder/%s/instances/" % cluster, "-w", "json"],
                           capture_output=True, text=True, env=env, timeout=10)
        if r.returncode != 0:
            return None
        import base64
        out = {}
        for kv in json.loads(r.stdout).get("kvs", []):
            k = base64.b64decode(kv["key"]).decode()
            out[k.rsplit("/", 1)[1]] = json.loads(base64.b64decode(kv["value"]))
        return out
