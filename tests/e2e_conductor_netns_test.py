#!/usr/bin/python3
"""The conductor across network namespaces, with failures: five "hosts" (etcd, conductor, i1, i2, i3)
joined by veth links to one bridge (tests/netns.py); i1..i3 are `larder serve` instances (role both,
SmolLM2, 1 thread each, --cluster-ttl 2) registered in etcd; the conductor follows them and their KV
events; the KV pool's fetches between instances go over UCX's TCP transport (UCX_TLS=tcp: between
processes of one machine UCX would otherwise use shared memory, which bypasses the links). The
reference is a plain `larder serve` in the root namespace on loopback (1 thread), started first and
asked the same requests alone, one at a time.

Run by ctest (label: e2e) with LARDER_BIN (and LARDER_SOURCE_DIR) set. Exit 77 (skipped, reason
printed) when network namespaces are not usable (not root, no iproute2), etcd is not installed,
SmolLM2 is not cached (scripts/models smollm2) or the shared sample text is missing. Checks:

  1. failover mid-stream: a greedy streamed completion (ignore_eos, 200 tokens) through the conductor;
     after about a third of its text the instance serving it (the conductor's
     larder_conductor_instance_inflight, cross-checked with the instance's larder_running_sequences)
     is SIGKILLed; the stream completes (one completion id, [DONE]) and its text equals the reference's
     byte for byte, usage counting all 200 tokens. Same for a chat completion stream (one role chunk).
     larder_conductor_resumes_total grows. The victim is restarted in its namespace on the same port.
     (1b) one long stream whose serving instance is killed three times in a row, each restarted on
     its address (as a pod keeps its address) and followed by the conductor before the next kill:
     after the third failure two healthy instances are up, so the stream must still complete.
  2. prefill killed: a ~1500-token prompt (streamed, then not streamed) is in flight before its first
     token; the instance computing it (larder_conductor_instance_queued_prefill_tokens) is SIGKILLed;
     the request is re-issued and completes on another instance with the reference's answer (the
     output says what was observed when it does not: a clean JSON error or a cut stream).
  3. etcd down and back: etcd is SIGKILLed; the conductor's /health says so; requests through the
     conductor still succeed on the last known membership (several, equal to the reference); etcd
     restarts on the same data dir; the three instances are registered again (etcdctl), the conductor's
     /health says etcd is up and follows all three, and requests still succeed.
  4. load with chaos: 64 concurrent greedy streams (completions and chats, prompts of ~50-800 tokens
     sharing prefixes in groups, 32-96 generated tokens) through the conductor while a chaos thread
     SIGKILLs an instance (the busiest), restarts it 2 s later in its namespace (same port, or a new
     one), 4 times, never two down at once; each client repeats its request until the 4 kills are done (so
     they land during the load on a fast machine too). Each stream ends correct (text, finish reason and token
     count of the reference, computed before on the reference instance, one at a time) or with a clean
     error (HTTP 4xx/5xx with an OpenAI-style JSON body, or a stream cut before [DONE] whose text so far
     is a prefix of the reference's; counted and listed): no wrong answer (a hung stream, 90 s without
     a byte, is one), most (more than half) correct. The prompts nest at word ends only (see
     load_work: the prompt caches would otherwise make an answer depend on what the server was asked
     before). Afterwards, with no load,
     nothing leaked (bounded waits): every live instance has larder_kv_blocks_used,
     larder_running_sequences and larder_requests_active at 0; the conductor's
     larder_conductor_instance_inflight and larder_conductor_instance_queued_prefill_tokens are all 0,
     larder_router_requests_in_flight 0; the index holds no block of a killed instance and no
     larder_conductor_index_blocks series names one (within the lease + a margin).
  5. teardown leaves no namespace, veth or bridge of this run.

A global deadline (DEADLINE_S, SIGALRM) bounds the whole run; every wait is bounded as well. A short
summary (counts and timings) is printed at the end. LARDER_E2E_LOGDIR=DIR keeps every process's stderr
there (the conductor runs with -v).
"""

import http.client
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import netns  # noqa: E402
import pdlib  # noqa: E402
from pdlib import metrics, req  # noqa: E402

FAILS = []
CLUSTER = "ncx"
TTL = 2
PORT = 8100                  # each instance's API port in its namespace (restarts reuse it or take a new one)
DEADLINE_S = 400             # all of it; every wait below is bounded as well
N_LOAD = 64
KILLS = 4
SERVE_ARGS = ["-c", "4096", "--parallel", "4"]
T0 = time.time()


class Overdue(Exception):
    """SIGALRM at DEADLINE_S (not an OSError: the bounded waits retry those)."""


def log(msg=""):
    print(msg, flush=True)


def check(ok, what):
    log("  %-92s %s" % (what, "PASS" if ok else "FAIL"))
    if not ok:
        FAILS.append(what)
    return ok


def skip(why):
    log("SKIP: " + why)
    sys.exit(77)


def wait_for(cond, timeout, step=0.1):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if cond():
                return True
        except (OSError, ValueError, KeyError, AssertionError, http.client.HTTPException):
            pass
        time.sleep(step)
    try:
        return bool(cond())
    except (OSError, ValueError, KeyError, AssertionError, http.client.HTTPException):
        return False


def base_text():
    shared = os.environ.get("LARDER_SHARED") or os.path.join(pdlib.REPO, "..", "shared")
    path = os.path.join(shared, "text", "tinystories-samples.txt")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    # 2,654 characters: copies starting further in give a longer text (~2,000 tokens) without repeats
    # close together.
    return text + "\n" + text[700:] + "\n" + text[1400:] + "\n" + text


def word_start(text, pos):
    """The first index >= pos where a word begins (after a space)."""
    while not (text[pos - 1] == " " and text[pos].isalpha()):
        pos += 1
    return pos


def word_end(text, pos):
    """The last index <= pos where a word ends and a space and a word follow."""
    while not (text[pos - 1].isalpha() and text[pos] == " " and text[pos + 1].isalpha()):
        pos -= 1
    return pos


def load_work(base):
    """N_LOAD requests: (path, body). Eight groups, each of nested texts (one beginning, cut at
    different lengths): the instances and the conductor find their shared prefixes cached (the KV
    index, fetches). Every cut is at the end of a word followed by " word" in the longer texts and each
    text is followed by a tail that is no continuation of the story, so that the prompt caches (the
    instances' and the conductor's, which reuse an earlier request's token ids up to a token boundary
    inside the longest common text prefix) give the same token ids whatever was asked before: the ids
    a fresh tokenization gives. (Cut mid-word, a nested prompt is tokenized differently after its
    shorter sibling was answered, and its answer depends on the server's history.)"""
    work = []
    for i in range(N_LOAD):
        g = i % 8
        start = word_start(base, g * 431 + 1)
        n_tok = 50 + (i * 37) % 751
        text = base[start:word_end(base, start + int(n_tok * 4.1))]
        n_gen = 32 + (i * 13) % 65
        body = {"max_tokens": n_gen, "temperature": 0}
        if i % 3 == 0:
            body["ignore_eos"] = True
        if i % 2:
            path = "/v1/chat/completions"
            msgs = [{"role": "user", "content": text + "\n\nWhat happens next?"}]
            if g % 2:
                msgs.insert(0, {"role": "system", "content": "You are a helpful assistant. Answer briefly."})
            body["messages"] = msgs
        else:
            path = "/v1/completions"
            body["prompt"] = text + "\n\n"
        work.append((path, body))
    return work


def is_openai_error(body):
    try:
        j = json.loads(body)
        return isinstance(j.get("error"), dict) and isinstance(j["error"].get("message"), str) and "type" in j["error"]
    except (ValueError, AttributeError, TypeError):
        return False


class Stream:
    """One streamed request (SSE) and what came back."""

    def __init__(self):
        self.status = None
        self.text = ""
        self.pieces = []       # text of each data event
        self.done = False      # [DONE] seen
        self.after_done = False
        self.usage = None
        self.finish = None
        self.ids = set()
        self.roles = 0         # chat: chunks carrying delta.role
        self.error_body = ""
        self.cut = ""          # why the stream ended without [DONE]
        self.exc = ""          # the client's own error (timeout, ...)
        self.t_first = None
        self.t_end = None


def stream(host, port, path, body, on_event=None, timeout=120, state=None):
    """POST body with stream: true (usage included). on_event(stream) after each data event."""
    s = state or Stream()
    t0 = time.time()
    b = dict(body, stream=True, stream_options={"include_usage": True})
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("POST", path, body=json.dumps(b), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        s.status = r.status
        if r.status != 200 or "text/event-stream" not in (r.getheader("Content-Type") or ""):
            s.error_body = r.read().decode(errors="replace")
            return s
        buf = b""
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                ev = ev.decode(errors="replace")
                if not ev.startswith("data: "):
                    continue
                data = ev[6:]
                if data == "[DONE]":
                    s.done = True
                    continue
                if s.done:
                    s.after_done = True
                j = json.loads(data)
                if j.get("id"):
                    s.ids.add(j["id"])
                if j.get("usage"):
                    s.usage = j["usage"]
                for ch in j.get("choices") or []:
                    d = ch.get("delta") or {}
                    if d.get("role"):
                        s.roles += 1
                    t = ch.get("text") or d.get("content") or ""
                    if t and s.t_first is None:
                        s.t_first = time.time() - t0
                    s.text += t
                    s.pieces.append(t)
                    if ch.get("finish_reason"):
                        s.finish = ch["finish_reason"]
                if on_event:
                    on_event(s)
        if not s.done:
            s.cut = "connection closed before [DONE]"
    except Exception as e:  # noqa: BLE001  (a cut stream: reset, incomplete chunked read, timeout)
        s.exc = "%s: %s" % (type(e).__name__, e)
        if not s.done:
            s.cut = s.exc
    finally:
        c.close()
        s.t_end = time.time() - t0
    return s


def post(host, port, path, body, timeout=120):
    """A non-streamed request: (status, parsed JSON or None, raw body)."""
    st, _, data = req(host, port, "POST", path, body, timeout=timeout)
    try:
        return st, json.loads(data), data
    except ValueError:
        return st, None, data


def answer_of(j, chat):
    """(text, finish_reason, completion_tokens) of a non-streamed answer."""
    c = j["choices"][0]
    text = c["message"]["content"] if chat else c["text"]
    return text, c.get("finish_reason"), j.get("usage", {}).get("completion_tokens")


def labeled(m, name):
    """{label value: number} of a one-label metric family."""
    out = {}
    pre = name + "{"
    for k, v in m.items():
        if k.startswith(pre):
            mm = re.search(r'instance="([^"]*)"', k)
            if mm:
                out.setdefault(mm.group(1), 0)
                out[mm.group(1)] += v
    return out


def main():
    ok, why = netns.available()
    if not ok:
        skip("network namespaces are not usable here: " + why)
    if not shutil.which("etcd") or not shutil.which("etcdctl"):
        skip("etcd is not installed (apt-get install etcd-server etcd-client)")
    model = pdlib.model_path("smollm2")
    if not model:
        skip("SmolLM2 is not cached (scripts/models smollm2)")
    base = base_text()
    if not base:
        skip("the shared sample text (text/tinystories-samples.txt) is missing")
    timings = {}
    summary = {}

    def overdue(sig, frame):
        raise Overdue("the test ran past %d s" % DEADLINE_S)
    signal.signal(signal.SIGALRM, overdue)
    signal.alarm(DEADLINE_S)
    names = ["i1", "i2", "i3"]
    cl = netns.Cluster(["etcd", "conductor"] + names)
    tag = cl.tag
    procs = []        # every larder process started (killed at the end, by their Popen)
    plock = threading.Lock()
    etcd = None
    env = dict(os.environ, UCX_TLS="tcp")
    inst = {}         # name -> {"proc", "port", "id"}
    killed_ids = []   # registered ids of SIGKILLed instances
    try:
        cl.start()  # first: SIGTERM now ends in the finally below
        if cl.stale:
            log("removed leftovers of earlier runs: %s" % cl.stale)
        t = time.time()
        C = pdlib.serve(model, SERVE_ARGS, "reference", threads="1")
        procs.append(C)
        etcd = pdlib.Etcd(host=cl.host("etcd"), prefix=cl.prefix("etcd"), port=2379, peer_port=2380)
        cluster_args = ["--cluster", etcd.url(), "--cluster-name", CLUSTER, "--cluster-ttl", str(TTL)]

        def registered():
            """{id: api address} in etcd (None when etcd does not answer)."""
            r = etcd.instances(CLUSTER)
            return None if r is None else {k: v.get("api_address") for k, v in r.items()}

        def start_instance(name, port):
            p = pdlib.Proc([pdlib.larder_bin(), "serve", "-m", model, "--host", cl.host(name), "--port", str(port),
                            "-t", "1", "--role", "both"] + SERVE_ARGS + cluster_args, name, prefix=cl.prefix(name),
                           env=env)
            with plock:
                procs.append(p)
            p.host = cl.host(name)
            pdlib.wait_ready(p, timeout=60)
            inst[name] = {"proc": p, "port": p.port, "id": None}
            addr = "%s:%d" % (p.host, p.port)

            def known():
                ids = [k for k, v in (registered() or {}).items() if v == addr and k not in killed_ids]
                if len(ids) == 1:
                    inst[name]["id"] = ids[0]
                return len(ids) == 1
            if not wait_for(known, 15, 0.2):
                raise RuntimeError("%s (%s) did not register in etcd: %s" % (name, addr, registered()))
            return p

        def api(name):
            return "%s:%d" % (cl.host(name), inst[name]["port"])

        def name_of_id(i):
            return next((n for n in names if inst[n]["id"] == i), None)

        for n in names:
            start_instance(n, PORT)
        cd = pdlib.Proc([pdlib.larder_bin(), "conductor", "-m", model, "--host", cl.host("conductor"), "--port", "0", "-v"] +
                        cluster_args[:4], "conductor", prefix=cl.prefix("conductor"), env=env,
                        pattern=r"larder conductor: listening on http://[^:]+:(\d+)")
        procs.append(cd)
        cd.host = cl.host("conductor")
        timings["startup"] = time.time() - t
        log("hosts: %s on %s; root namespace at %s" % (
            ", ".join("%s %s" % (h, cl.host(h)) for h in cl.hosts), cl.subnet, cl.root_address))
        for n in names:
            line = next((l.strip() for l in inst[n]["proc"].lines if "KV transfer on" in l), "?")
            log("  %s: %s" % (n, line))

        def health():
            return json.loads(req(cd.host, cd.port, "GET", "/health", timeout=5)[2])

        def members_ok(n_live):
            """etcd lists exactly the live instances, the conductor routes to them and follows their events."""
            reg = registered()
            if reg is None:
                return False
            live = {inst[n]["id"]: api(n) for n in names if inst[n]["proc"].alive()}
            h = health()
            return (reg == live and len(live) == n_live and h.get("decode") == n_live and
                    h.get("index", {}).get("instances") == n_live and h.get("index", {}).get("synced") == n_live)

        check(set((registered() or {}).values()) == {api(n) for n in names},
              "the three instances registered in etcd with their namespaces' addresses")
        check(wait_for(lambda: members_ok(3), 20), "the conductor follows the three instances and their KV events")

        def cmetrics():
            return metrics(cd)

        def inflight():
            return {k: v for k, v in labeled(cmetrics(), "larder_conductor_instance_inflight").items() if v > 0}

        def restart(name, same_port=True):
            inst[name]["proc"].kill()
            return start_instance(name, PORT if same_port else 0)

        fetches = {}  # KV pool fetches of the instances (read from each before it is killed, and at the end)

        def count_fetches(p):
            try:
                for k, v in metrics(p).items():
                    if k.startswith("larder_kv_fetches_total{"):
                        r = k.split('"')[1]
                        fetches[r] = fetches.get(r, 0) + int(v)
            except (OSError, AssertionError, http.client.HTTPException):
                pass

        def kill(name, why):
            i = inst[name]["id"]
            count_fetches(inst[name]["proc"])
            inst[name]["proc"].kill()
            if i:
                killed_ids.append(i)
            log("    SIGKILL %s (%s, id %s): %s" % (name, api(name), i, why))

        # ------------------------------------------------------------------ 1
        log("(1) failover mid-stream, completion and chat")
        t = time.time()
        resumes0 = cmetrics().get("larder_conductor_resumes_total", 0)
        cases = [("completion", "/v1/completions",
                  {"prompt": base[:2400], "max_tokens": 200, "temperature": 0, "ignore_eos": True}),
                 ("chat", "/v1/chat/completions",
                  {"messages": [{"role": "system", "content": "You are a storyteller."},
                                {"role": "user", "content": "Continue this story: " + base[2400:4200]}],
                   "max_tokens": 200, "temperature": 0, "ignore_eos": True})]
        for what, path, body in cases:
            ref = stream("127.0.0.1", C.port, path, body)
            if not check(ref.status == 200 and ref.done and ref.usage, "%s: the reference answered (status %s)" % (
                    what, ref.status)):
                continue
            victim = {}

            def on_event(s, ref=ref, victim=victim):
                if victim or len(s.text) < len(ref.text) // 3:
                    return
                ids = inflight()
                name = name_of_id(next(iter(ids), None)) if len(ids) == 1 else None
                if name is None:  # fall back on the instances' own gauges
                    busy = [n for n in names if metrics(inst[n]["proc"]).get("larder_running_sequences", 0) >= 1]
                    name = busy[0] if len(busy) == 1 else None
                    victim["how"] = "larder_running_sequences"
                else:
                    victim["how"] = "conductor inflight%s" % (
                        "" if metrics(inst[name]["proc"]).get("larder_running_sequences", 0) >= 1 else
                        " (its larder_running_sequences is 0!)")
                if name:
                    victim["name"] = name
                    victim["at"] = len(s.text)
                    kill(name, "%s mid-stream after %d of %d bytes" % (what, len(s.text), len(ref.text)))

            got = stream(cd.host, cd.port, path, body, on_event=on_event)
            check("name" in victim, "%s: the serving instance was found (%s) and killed mid-stream" % (
                what, victim.get("how", "not found")))
            same = got.status == 200 and got.done and got.text == ref.text
            if not check(same, "%s: the stream completed, equal to the reference byte for byte (%d bytes; %s)" % (
                    what, len(got.text), got.cut or "done")):
                log("    reference: %r\n    conductor: %r\n    status %s %s" % (ref.text, got.text, got.status,
                                                                                 got.error_body[:300]))
            check(got.usage and got.usage.get("completion_tokens") == ref.usage["completion_tokens"] == 200 and
                  got.finish == ref.finish,
                  "%s: usage counts all %d tokens (%s), finish_reason %s (reference %s)" % (
                      what, ref.usage["completion_tokens"], (got.usage or {}).get("completion_tokens"), got.finish,
                      ref.finish))
            check(len(got.ids) == 1 and not got.after_done, "%s: one completion id across the attempts (%d), nothing after [DONE]"
                  % (what, len(got.ids)))
            if path.endswith("chat/completions"):
                check(got.roles == 1, "%s: exactly one role chunk (%d)" % (what, got.roles))
            log("    event pieces equal to the reference's: %s (%d vs %d events)" % (
                got.pieces == ref.pieces, len(got.pieces), len(ref.pieces)))
            if "name" in victim:
                restart(victim["name"])
        resumes1 = cmetrics().get("larder_conductor_resumes_total", 0)
        check(resumes1 >= resumes0 + 2, "larder_conductor_resumes_total grew by %d (>= 2)" % (resumes1 - resumes0))
        check(wait_for(lambda: members_ok(3), 20),
              "the restarted instances are registered and followed again (3 instances)")
        timings["failover"] = time.time() - t

        log("(1b) one stream whose instance dies three times, each restarted on its address before the next")
        # Instances restart where they were (a pod keeps its address): after the third failure the
        # two restarted instances are healthy, registered and followed, so the stream can go on.
        t = time.time()
        body = {"prompt": base[4200:4700], "max_tokens": 1800, "temperature": 0, "ignore_eos": True}
        ref = stream("127.0.0.1", C.port, "/v1/completions", body)
        s = Stream()
        th = threading.Thread(target=stream, args=(cd.host, cd.port, "/v1/completions", body),
                              kwargs={"state": s, "timeout": 120}, daemon=True)
        th.start()
        kills = []
        for k in range(3):
            grown = len(s.text) + 60
            if not wait_for(lambda: len(s.text) >= grown or s.t_end is not None, 30, 0.05) or s.t_end is not None:
                break
            ids = inflight()
            name = name_of_id(next(iter(ids), None)) if len(ids) == 1 else None
            if name is None:
                log("    serving instance not found: %s" % ids)
                break
            kill(name, "successive failure %d, after %d of %d bytes" % (k + 1, len(s.text), len(ref.text)))
            kills.append(name)
            restart(name, same_port=True)
            if not wait_for(lambda: members_ok(3), 20):
                log("    the restarted %s was not followed within 20 s" % name)
        th.join(120)
        check(len(set(kills)) == 3, "the stream was served by each instance in turn, each killed mid-stream (%s)" % kills)
        okb = s.status == 200 and s.done and s.text == ref.text
        if not check(okb, "after three failures (two instances restarted healthy) the stream completed = reference (%s)" % (
                "done" if s.done else "cut after %d of %d bytes: %s" % (len(s.text), len(ref.text), s.cut))):
            log("    status %s, reference done %s; the text so far is the reference's beginning: %s" % (
                s.status, ref.done, ref.text.startswith(s.text)))
        check(wait_for(lambda: members_ok(3), 20), "three instances again")
        timings["successive failures"] = time.time() - t

        # ------------------------------------------------------------------ 2
        log("(2) the instance computing a long prompt is killed before its first token")
        t = time.time()
        for streamed in (True, False):
            what = "streamed" if streamed else "not streamed"
            # Two prompts with different beginnings: nothing of the second is cached anywhere.
            long_prompt = base[1000:7300] if streamed else base[1700:8000]
            body = {"prompt": long_prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            st, rj, _ = post("127.0.0.1", C.port, "/v1/completions", body)
            if not check(st == 200, "%s: the reference answered (status %d)" % (what, st)):
                continue
            ref_text, _, _ = answer_of(rj, False)
            n_prompt = rj["usage"]["prompt_tokens"]
            res = {}

            def client(body=body, res=res, streamed=streamed):
                if streamed:
                    res["s"] = stream(cd.host, cd.port, "/v1/completions", body, timeout=120)
                else:
                    try:
                        res["j"] = post(cd.host, cd.port, "/v1/completions", body, timeout=120)
                    except Exception as e:  # noqa: BLE001
                        res["exc"] = "%s: %s" % (type(e).__name__, e)
            th = threading.Thread(target=client, daemon=True)
            th.start()
            victim = None

            def find():
                nonlocal victim
                q = {k: v for k, v in labeled(cmetrics(), "larder_conductor_instance_queued_prefill_tokens").items()
                     if v > 0}
                if len(q) == 1:
                    victim = name_of_id(next(iter(q)))
                return victim is not None
            found = wait_for(find, 10, 0.05)
            first_before = bool(res.get("s") and res["s"].text) or "j" in res  # text (or the whole answer) came first
            dec = inflight()
            if found:
                kill(victim, "%s, %d-token prompt queued there (decode on %s), no text yet: %s" % (
                    what, n_prompt, [name_of_id(k) for k in dec], not first_before))
            th.join(150)
            check(found and not first_before, "%s: its prefill instance was found and killed before the first token" % what)
            if streamed:
                s = res.get("s")
                okd = s is not None and s.status == 200 and s.done and s.text == ref_text
                if not okd and s is not None:
                    log("    observed: status %s, done %s, cut %r, error %s, text %r" % (
                        s.status, s.done, s.cut, s.error_body[:300], s.text[:200]))
            else:
                st2, j2, raw = res.get("j", (None, None, b""))
                okd = st2 == 200 and j2 is not None and answer_of(j2, False)[0] == ref_text
                if not okd:
                    log("    observed: status %s, OpenAI-style error: %s, body %r %s" % (
                        st2, is_openai_error(raw or b"{}"), (raw or b"")[:300], res.get("exc", "")))
            check(okd, "%s: the %d-token request completed on another instance, equal to the reference" % (what, n_prompt))
            if victim:
                restart(victim)
        check(wait_for(lambda: members_ok(3), 20), "three instances again after the restarts")
        timings["prefill kill"] = time.time() - t

        # ------------------------------------------------------------------ 3
        log("(3) etcd down and back")
        t = time.time()
        small = [("/v1/completions", {"prompt": base[300 + 150 * k:300 + 150 * k + 400], "max_tokens": 12, "temperature": 0})
                 for k in range(4)]
        small += [("/v1/chat/completions", {"messages": [{"role": "user", "content": base[5000 + 200 * k:5000 + 200 * k + 300]}],
                                            "max_tokens": 12, "temperature": 0}) for k in range(2)]
        refs3 = []
        for path, body in small:
            st, j, _ = post("127.0.0.1", C.port, path, body)
            refs3.append(answer_of(j, "chat" in path)[0] if st == 200 else None)

        def all_answer(label):
            good = 0
            for (path, body), rt in zip(small, refs3):
                st, j, raw = post(cd.host, cd.port, path, body, timeout=60)
                good += st == 200 and j is not None and answer_of(j, "chat" in path)[0] == rt
                if st != 200:
                    log("    %s: %s %s" % (label, st, raw[:200]))
            return good
        etcd.stop()
        check(wait_for(lambda: health().get("etcd") == "down", 15), "etcd killed: the conductor's /health says etcd is down")
        good = all_answer("etcd down")
        check(good == len(small), "with etcd down, %d/%d requests through the conductor answered like the reference" % (
            good, len(small)))
        check(health().get("decode") == 3, "the conductor kept the last known membership (3 instances)")
        time.sleep(TTL + 1)  # past the instances' lease TTL: etcd must not lose them when it is back
        etcd.start()
        check(wait_for(lambda: registered() == {inst[n]['id']: api(n) for n in names}, 20),
              "etcd back (same data dir): the three instances are registered again")
        check(wait_for(lambda: health().get("etcd") == "up", 20), "the conductor's /health says etcd is up again")
        check(wait_for(lambda: members_ok(3), 20), "and it follows the three instances")
        good = all_answer("etcd back")
        check(good == len(small), "after etcd came back, %d/%d requests answered like the reference" % (good, len(small)))
        timings["etcd"] = time.time() - t

        # ------------------------------------------------------------------ 4
        log("(4) %d concurrent streams with chaos (%d kills)" % (N_LOAD, KILLS))
        t = time.time()
        work = load_work(base)
        refs = []
        for path, body in work:
            st, j, raw = post("127.0.0.1", C.port, path, body)
            if st != 200:
                raise RuntimeError("reference: status %d %s" % (st, raw[:300]))
            refs.append(answer_of(j, "chat" in path) + (j["usage"]["prompt_tokens"],))
        timings["load references"] = time.time() - t
        plens = [r[3] for r in refs]
        log("    references: %.0f s; prompt tokens %d..%d (mean %.0f), completion tokens %d..%d" % (
            timings["load references"], min(plens), max(plens), sum(plens) / len(plens), min(r[2] for r in refs),
            max(r[2] for r in refs)))

        # Each client repeats its request until the chaos thread has done its kills, so they all land while
        # the load runs however fast this machine answers (64 single requests can finish within one kill).
        results = [[] for _ in range(N_LOAD)]  # per client: one stream result per round (None: unfinished)
        load_done, chaos_done = threading.Event(), threading.Event()
        chaos_log = []
        chaos_err = []
        resumes0 = cmetrics().get("larder_conductor_resumes_total", 0)

        def one(i):
            path, body = work[i]
            while True:
                results[i].append(None)
                results[i][-1] = stream(cd.host, cd.port, path, body, timeout=90)  # 90 s without a byte: hung
                if chaos_done.is_set() or time.time() - tl > 100:
                    break

        def chaos():
            rng = random.Random(7)
            try:
                time.sleep(3)
                for k in range(KILLS):
                    if load_done.is_set() and k >= 3:
                        break
                    live = [n for n in names if inst[n]["proc"].alive()]
                    busy = {}
                    for n in live:
                        try:
                            busy[n] = metrics(inst[n]["proc"]).get("larder_running_sequences", 0)
                        except (OSError, AssertionError, http.client.HTTPException):
                            busy[n] = 0
                    victim = max(live, key=lambda n: (busy[n], rng.random()))
                    kill(victim, "chaos %d, %d running there" % (k + 1, busy[victim]))
                    tk = time.time()
                    time.sleep(2)
                    same = k % 2 == 0
                    restart(victim, same_port=same)
                    chaos_log.append((victim, busy[victim], same, time.time() - tk, load_done.is_set()))
                    log("    %s back on port %d (%s) after %.1f s" % (victim, inst[victim]["port"],
                                                                       "same port" if same else "new port", time.time() - tk))
                    time.sleep(4)
            except Exception as e:  # noqa: BLE001
                chaos_err.append("%s: %s" % (type(e).__name__, e))
            finally:
                chaos_done.set()

        ths = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(N_LOAD)]
        tl = time.time()
        for th in ths:
            th.start()
            time.sleep(0.01)
        ch = threading.Thread(target=chaos, daemon=True)
        ch.start()
        for th in ths:
            th.join(max(1, 150 - (time.time() - tl)))
        load_done.set()
        timings["load"] = time.time() - tl
        ch.join(60)
        check(not chaos_err and not ch.is_alive(), "the chaos thread ran to its end %s" % (chaos_err or ""))
        during = sum(1 for c in chaos_log if not c[4])
        check(len(chaos_log) >= 3 and during >= 3, "%d kills and restarts, %d of them while the load ran" % (
            len(chaos_log), during))

        correct, clean_http, cut, wrong, anomalies = [], [], [], [], []
        flat = [(i, s) for i in range(N_LOAD) for s in results[i]]
        for i, s in flat:
            path, ref = work[i][0], refs[i]
            chat = "chat" in path
            rt, rf, rn, _ = ref
            if s is None:
                wrong.append((i, "no answer (the client did not finish)"))
                continue
            if s.status != 200:
                (clean_http if 400 <= s.status < 600 and is_openai_error(s.error_body) else wrong).append(
                    (i, "HTTP %s %s" % (s.status, s.error_body[:160])))
                continue
            if s.done:
                if s.text == rt and s.finish == rf and (s.usage or {}).get("completion_tokens") == rn:
                    correct.append(i)
                else:
                    wrong.append((i, "completed but differs: finish %s/%s, prompt tokens %s/%s, completion tokens %s/%s"
                                  "\n      got %r\n      ref %r" % (s.finish, rf, (s.usage or {}).get("prompt_tokens"),
                                                                    ref[3], (s.usage or {}).get("completion_tokens"), rn,
                                                                    s.text, rt)))
            elif rt.startswith(s.text) and not s.exc.startswith("timeout") and "timed out" not in s.exc:
                cut.append((i, "%s after %d/%d bytes" % (s.cut, len(s.text), len(rt))))
            else:
                wrong.append((i, "cut (%s) with text that is not the reference's beginning: %r" % (s.cut, s.text[-100:])))
            if len(s.ids) > 1 or s.after_done or (chat and s.done and s.roles != 1):
                anomalies.append((i, "ids %d, roles %d, data after [DONE] %s" % (len(s.ids), s.roles, s.after_done)))
        mc = cmetrics()
        resumes = mc.get("larder_conductor_resumes_total", 0) - resumes0
        log("    conductor (whole run): requests %s; fetch routes %d; router failovers %d, upstream errors %d" % (
            {k.split('"')[1]: int(v) for k, v in mc.items() if k.startswith("larder_conductor_requests_total{")},
            mc.get("larder_conductor_fetch_routes_total", 0), mc.get("larder_router_failovers_total", 0),
            mc.get("larder_router_upstream_errors_total", 0)))
        for n in names:
            count_fetches(inst[n]["proc"])
        log("    KV pool fetches (X-Larder-Fetch, over UCX) by the instances, whole run: %s" % (fetches or "none"))
        summary = {"correct": len(correct), "clean HTTP errors": len(clean_http), "cut streams": len(cut),
                   "wrong": len(wrong), "resumes": int(resumes), "kills": len(chaos_log)}
        ttfts = sorted(s.t_first for _, s in flat if s is not None and s.t_first is not None)
        ends = sorted(s.t_end for _, s in flat if s is not None and s.t_end is not None)
        log("    %d streams (%d clients) in %.1f s: %d correct, %d clean HTTP errors, %d cut streams, %d wrong; %d resumes" % (
            len(flat), N_LOAD, timings["load"], len(correct), len(clean_http), len(cut), len(wrong), resumes))
        if ttfts and ends:
            log("    time to first token: median %.1f s, max %.1f s; stream duration median %.1f s, max %.1f s" % (
                ttfts[len(ttfts) // 2], ttfts[-1], ends[len(ends) // 2], ends[-1]))
        for i, why in clean_http + cut:
            log("    request %d (%s): %s" % (i, work[i][0], why))
        for i, why in wrong:
            log("    WRONG request %d (%s): %s" % (i, work[i][0], why))
        check(not wrong, "no wrong answer (%d)" % len(wrong))
        check(len(correct) > len(flat) // 2, "most streams correct (%d/%d)" % (len(correct), len(flat)))
        check(not anomalies, "streams well formed: one id, one role chunk for chats, nothing after [DONE] %s" % (
            anomalies[:4] or ""))
        check(resumes >= 1, "the conductor resumed streams of killed instances (%d)" % resumes)

        log("    after the load: leaks")
        check(wait_for(lambda: members_ok(3), 20),
              "three live instances, registered and followed (%s)" % ", ".join("%s %s" % (n, inst[n]["id"]) for n in names))
        ts = time.time()

        def idle(n):
            m = metrics(inst[n]["proc"])
            return {k: m.get(k) for k in ("larder_kv_blocks_used", "larder_running_sequences", "larder_requests_active")}
        for n in names:
            okn = wait_for(lambda: all(v == 0 for v in idle(n).values()), 20, 0.2)
            check(okn, "%s: kv_blocks_used, running_sequences, requests_active all 0 (%s)" % (n, idle(n)))

        def cd_idle():
            m = cmetrics()
            return (labeled(m, "larder_conductor_instance_inflight"),
                    labeled(m, "larder_conductor_instance_queued_prefill_tokens"),
                    m.get("larder_router_requests_in_flight"))
        okc = wait_for(lambda: (lambda a, b, c: not any(a.values()) and not any(b.values()) and c == 0)(*cd_idle()), 20, 0.2)
        a, b, c = cd_idle()
        check(okc, "conductor: every instance_inflight and queued_prefill_tokens 0, router in flight 0")
        if not okc:
            log("    inflight %s\n    queued prefill tokens %s\n    router in flight %s" % (a, b, c))
        timings["settle"] = time.time() - ts

        def index_series():
            return labeled(cmetrics(), "larder_conductor_index_blocks")
        tw = time.time()
        empty = wait_for(lambda: all(index_series().get(i, 0) == 0 for i in killed_ids), TTL + 8, 0.2)
        check(empty, "the index holds no block of the %d killed instances within %.0f s" % (len(killed_ids), time.time() - tw))
        gone = wait_for(lambda: not (set(index_series()) & set(killed_ids)), 1, 0.2)
        series = index_series()
        live_ids = {inst[n]["id"] for n in names}
        if not check(gone and set(series) <= live_ids,
                     "larder_conductor_index_blocks names only the live instances (%d series, %d of killed ids)" % (
                         len(series), len(set(series) & set(killed_ids)))):
            log("    series: %s\n    live: %s" % (series, sorted(live_ids)))
        check(all(p.alive() for p in [C, cd] + [inst[n]["proc"] for n in names]), "conductor, reference and instances alive")
        timings["load phase"] = time.time() - t
    except Exception as e:  # noqa: BLE001
        import traceback
        check(False, "unexpected error: %s: %s" % (type(e).__name__, e))
        log(traceback.format_exc())
        for p in procs:
            log("--- %s (last lines)\n%s" % (p.name, p.text()[-1500:]))
    finally:
        signal.alarm(0)
        with plock:
            ps = list(procs)
        logdir = os.environ.get("LARDER_E2E_LOGDIR")  # keep every process's stderr there (debugging)
        if logdir:
            os.makedirs(logdir, exist_ok=True)
            for k, p in enumerate(ps):
                with open(os.path.join(logdir, "%02d-%s.log" % (k, p.name)), "w") as f:
                    f.write(p.text())
        for p in ps:
            try:
                p.kill()
            except Exception:  # noqa: BLE001
                pass
        if etcd:
            etcd.close()
        cl.close()

    log("(5) teardown")
    left_ns = [n for n in netns.list_namespaces() if n.startswith(tag + "-")]
    left_links = [l for l in netns.list_links() if l.startswith(tag)]
    check(not left_ns and not left_links, "no namespace (%s) or link (%s) of %s left" % (left_ns, left_links, tag))
    log()
    if summary:
        log("summary: " + ", ".join("%s %d" % kv for kv in summary.items()))
    log("timings: " + ", ".join("%s %.0f s" % kv for kv in timings.items()) + "; total %.0f s" % (time.time() - T0))
    if FAILS:
        log("FAILED: %d check(s):\n  %s" % (len(FAILS), "\n  ".join(FAILS)))
        sys.exit(1)
    log("all conductor checks across namespaces passed")


if __name__ == "__main__":
    main()
