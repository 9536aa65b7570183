#!/usr/bin/python3
"""Several "hosts" on one machine: network namespaces joined by veth pairs to one bridge, with netem on
the links (tests/e2e_pd_netns_test.py; importable by benchmarks).

    ok, why = netns.available()            # root, iproute2, namespaces, veth and bridge usable?
    netns.netem_supported()                 # does the kernel have sch_netem? (not required: see Shaping)
    with netns.Cluster(["etcd", "prefill", "decode"]) as cl:
        cl.host("decode")                   # "10.233.X.12": its address
        cl.prefix("decode")                 # ["ip", "netns", "exec", NS]: run a command there
        cl.netem("decode", rate="10gbit", delay="20ms")
        cl.link_bytes("decode")             # {"rx": .., "tx": ..} of its veth (counted inside its namespace)

Layout (every name starts with lrd<pid>, the pid of the process that made them):

    namespace lrd<pid>-<host>:   lo, lrd<pid>h<i> (10.233.X.(10+i)/24)  -- veth --+
    namespace lrd<pid>-0bridge:  bridge lrd<pid>br, ports lrd<pid>b<i> ...     <--+--- lrd<pid>rb
    root namespace:              lrd<pid>r (10.233.X.1/24)  -- veth ------------------------+

The bridge lives in a namespace of its own, not in the root namespace: where the root namespace has
br_netfilter loaded (bridge-nf-call-iptables=1, as here) bridged frames go through the root's iptables
FORWARD chain, whose policy is DROP on many hosts (Docker sets it), and the host's links stay clean
(one veth in the root namespace, nothing else). That veth gives the test process in the root namespace
direct access to every host (its HTTP requests, /metrics, health checks) without routing anything: the
namespaces have no default route and the /24 is private and picked free of the root's routes and
addresses, so no packet can leave the machine.

Shaping (netem()): tc netem where the kernel has sch_netem; else (shaping="userspace", or "auto" on
such a kernel) a delay line: the bridge's end of the host's veth leaves the bridge and a small process
(this file, --delayline) forwards its frames to and from a new bridge port, delaying and pacing them.
The frames still cross the host's veth.

Cleanup: close() (on leaving the `with`, on exceptions, on SIGTERM/SIGHUP, which are turned into
SystemExit while the cluster is up) kills the processes left in its namespaces and deletes the
namespaces and the root veth (everything else goes with its namespace). A SIGKILL (ctest's timeout)
skips that: a detached reaper process, which waits for the pipe it shares with the cluster's process to
close, then does the same; and every new Cluster first removes the leftovers of earlier runs whose
process is gone.
"""

import ipaddress
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

TAG = "lrd"
_NS_RE = re.compile(r"^%s(\d+)-" % TAG)
_LINK_RE = re.compile(r"^%s(\d+)[a-z]" % TAG)
_HOST_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")


def _run(args, check=True, timeout=30):
    r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(args), r.returncode, (r.stderr or r.stdout).strip()))
    return r


def _nsexec(ns, args, check=True, timeout=30):
    return _run(["ip", "netns", "exec", ns] + list(args), check=check, timeout=timeout)


def list_namespaces():
    r = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def list_links(ns=None):
    """Names of the links of the root namespace (or of namespace ns)."""
    args = ["ip", "-o", "link", "show"]
    r = _nsexec(ns, args, check=False) if ns else _run(args, check=False)
    out = []
    for line in r.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            out.append(parts[1].strip().split("@")[0])
    return out


def _pid_alive(pid):
    return os.path.exists("/proc/%d" % pid)


def destroy(tag):
    """Removes everything named tag*: kills the processes in its namespaces (a namespace stays alive,
    with its links, while a process runs in it), deletes the namespaces and its root-namespace links.
    Idempotent; never raises."""
    try:
        mine = [ns for ns in list_namespaces() if ns.startswith(tag + "-")]
        for ns in mine:
            r = _run(["ip", "netns", "pids", ns], check=False)
            for p in r.stdout.split():
                try:
                    if int(p) != os.getpid():
                        os.kill(int(p), signal.SIGKILL)
                except (ValueError, OSError):
                    pass
        for ns in mine:
            _run(["ip", "netns", "del", ns], check=False)
        for link in list_links():
            if link.startswith(tag) and _LINK_RE.match(link):
                _run(["ip", "link", "del", link], check=False)
        # Namespaces are freed asynchronously: wait (bounded) for their veth peers to go.
        t0 = time.time()
        while time.time() - t0 < 5 and any(l.startswith(tag) for l in list_links()):
            time.sleep(0.05)
    except Exception:  # noqa: BLE001  (cleanup must not hide the error that led here)
        pass


def cleanup_stale():
    """Removes namespaces and root links of earlier runs whose process is gone. Returns their tags."""
    tags = set()
    for ns in list_namespaces():
        m = _NS_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            tags.add(TAG + m.group(1))
    for link in list_links():
        m = _LINK_RE.match(link)
        if m and not _pid_alive(int(m.group(1))):
            tags.add(TAG + m.group(1))
    for t in sorted(tags):
        destroy(t)
    return sorted(tags)


def _probe(steps):
    """Runs steps (command lines) in a fresh namespace; (True, "") or (False, why)."""
    tag = "%s%d" % (TAG, os.getpid())
    ns = tag + "-0probe"
    try:
        r = _run(["ip", "netns", "add", ns], check=False)
        if r.returncode != 0:
            return False, "ip netns add: " + r.stderr.strip()
        for s in steps:
            r = _nsexec(ns, [a.replace("@", tag) for a in s], check=False)
            if r.returncode != 0:
                return False, "%s: %s" % (" ".join(s).replace("@", tag), (r.stderr or r.stdout).strip())
        return True, ""
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    finally:
        destroy(tag)


def available():
    """(True, "") when this process can make namespaces, veth pairs and a bridge; else (False, reason).
    netem is not required (see netem_supported)."""
    if sys.platform != "linux":
        return False, "not Linux"
    if os.geteuid() != 0:
        return False, "not root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    for tool in ("ip", "tc", "ss"):
        if not shutil.which(tool):
            return False, "'%s' is not installed (apt-get install iproute2)" % tool
    return _probe([["ip", "link", "set", "lo", "up"],
                   ["ip", "link", "add", "@pa", "type", "veth", "peer", "name", "@pb"],
                   ["ip", "link", "add", "@pbr", "type", "bridge"]])


_NETEM = None


def netem_supported():
    """(True, "") when the kernel has sch_netem; else (False, why). Cached."""
    global _NETEM
    if _NETEM is None:
        _NETEM = _probe([["ip", "link", "set", "lo", "up"], ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]])
    return _NETEM


def _pick_subnet(pid):
    """A 10.233.X.0/24 that overlaps no route or address of the root namespace."""
    used = []
    for args in (["ip", "-4", "route", "show", "table", "all"], ["ip", "-4", "-o", "addr", "show"]):
        for tok in _run(args, check=False).stdout.split():
            try:
                used.append(ipaddress.ip_network(tok, strict=False))
            except ValueError:
                pass
    used = [u for u in used if u.prefixlen > 0]  # "default" does not parse; 0.0.0.0/0 would match all
    for k in range(254):
        x = (pid + k) % 254 + 1
        net = ipaddress.ip_network("10.233.%d.0/24" % x)
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.233.X.0/24 subnet")


class Cluster:
    """Hosts (network namespaces) on one bridge; see the module's docstring."""

    def __init__(self, hosts, root_access=True, shaping="auto"):
        """shaping: how netem() shapes a link: "netem" (tc qdiscs), "userspace" (a delay line process
        in the bridge's namespace, for kernels built without sch_netem) or "auto" (netem where the
        kernel has it)."""
        if shaping not in ("auto", "netem", "userspace"):
            raise ValueError("shaping: auto, netem or userspace")
        self.shaping = shaping
        self._lines = {}
        hosts = list(hosts)
        for h in hosts:
            if not _HOST_RE.match(h):
                raise ValueError("host name %r: lower-case letters and digits, 1-16 characters" % h)
        if len(set(hosts)) != len(hosts) or not hosts or len(hosts) > 200:
            raise ValueError("host names must be unique (1..200 of them)")
        self.hosts = hosts
        self.root_access = root_access
        self.tag = "%s%d" % (TAG, os.getpid())
        self.bridge_ns = self.tag + "-0bridge"
        self.bridge = self.tag + "br"
        self.subnet = None
        self.root_address = None
        self._addr, self._index = {}, {}
        self._reaper_w = None
        self._old_handlers = {}
        self._closed = False

    # --- names and addresses
    def ns(self, name):
        return "%s-%s" % (self.tag, name)

    def prefix(self, name):
        """Prepend to a command line to run it on host `name`."""
        return ["ip", "netns", "exec", self.ns(name)]

    def host(self, name):
        return self._addr[name]

    def veth(self, name):
        """The host's end of its link (inside its namespace)."""
        return "%sh%d" % (self.tag, self._index[name])

    def bridge_port(self, name):
        """The bridge's end of the host's link (inside the bridge's namespace)."""
        return "%sb%d" % (self.tag, self._index[name])

    # --- lifecycle
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def start(self):
        self.stale = cleanup_stale()
        if self.shaping == "auto":
            self.shaping = "netem" if netem_supported()[0] else "userspace"
        self._install_signals()
        self._spawn_reaper()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self):
        self.subnet = _pick_subnet(os.getpid())
        base = self.subnet.network_address
        plen = self.subnet.prefixlen
        _run(["ip", "netns", "add", self.bridge_ns])
        self._ns_init(self.bridge_ns)
        _nsexec(self.bridge_ns, ["ip", "link", "add", self.bridge, "type", "bridge"])
        _nsexec(self.bridge_ns, ["ip", "link", "set", self.bridge, "up"])
        for i, h in enumerate(self.hosts, 1):
            self._index[h] = i
            self._addr[h] = str(base + 10 + i)
            ns = self.ns(h)
            _run(["ip", "netns", "add", ns])
            self._ns_init(ns)
            # Both ends made directly in their namespaces: nothing of a host ever shows in the root's links.
            _run(["ip", "link", "add", "name", self.veth(h), "netns", ns, "type", "veth",
                  "peer", "name", self.bridge_port(h), "netns", self.bridge_ns])
            _nsexec(self.bridge_ns, ["ip", "link", "set", self.bridge_port(h), "master", self.bridge, "up"])
            _nsexec(ns, ["ip", "addr", "add", "%s/%d" % (self._addr[h], plen), "dev", self.veth(h)])
            _nsexec(ns, ["ip", "link", "set", self.veth(h), "up"])
        if self.root_access:
            r, rb = self.tag + "r", self.tag + "rb"
            _run(["ip", "link", "add", "name", r, "type", "veth", "peer", "name", rb, "netns", self.bridge_ns])
            _nsexec(self.bridge_ns, ["ip", "link", "set", rb, "master", self.bridge, "up"])
            self.root_address = str(base + 1)
            _run(["ip", "addr", "add", "%s/%d" % (self.root_address, plen), "dev", r])
            _run(["sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/%s/disable_ipv6" % r], check=False)
            _run(["ip", "link", "set", r, "up"])
        # Bounded wait until every host's link is up (carrier on both ends).
        t0 = time.time()
        while time.time() - t0 < 10:
            down = [h for h in self.hosts if "LOWER_UP" not in _nsexec(self.ns(h), ["ip", "link", "show", self.veth(h)]).stdout]
            if not down:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("links of %s did not come up" % down)

    def _ns_init(self, ns):
        _nsexec(ns, ["ip", "link", "set", "lo", "up"])
        # No IPv6 (router solicitations, DAD): the links' byte counters then count the tests' traffic.
        _nsexec(ns, ["sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                     "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6"], check=False)

    def close(self):
        if self._closed:
            return
        self._closed = True
        for p in self._lines.values():
            try:
                p.stdin.close()
            except OSError:
                pass
        destroy(self.tag)  # kills the delay lines too (they run in the bridge's namespace)
        for p in self._lines.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._lines = {}
        if self._reaper_w is not None:
            os.close(self._reaper_w)  # the reaper wakes, finds nothing left and exits
            self._reaper_w = None
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers = {}

    def leftovers(self):
        """Namespaces and root links of this cluster that still exist (empty after close())."""
        return ([n for n in list_namespaces() if n.startswith(self.tag + "-")] +
                [l for l in list_links() if l.startswith(self.tag)])

    def _install_signals(self):
        def handler(sig, frame):
            raise SystemExit(128 + sig)
        for s in (signal.SIGTERM, signal.SIGHUP):
            try:
                if signal.getsignal(s) == signal.SIG_DFL:
                    self._old_handlers[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread: the reaper still cleans up
                pass

    def _spawn_reaper(self):
        r, w = os.pipe()  # both ends close-on-exec: no other child holds w
        try:
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--reap", self.tag], stdin=r,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            p.wait(timeout=10)  # it forks the reaper off and exits: the reaper is no child of ours
            self._reaper_w = w
        except (OSError, subprocess.SubprocessError):
            os.close(w)
        finally:
            os.close(r)

    # --- links
    def netem(self, name, rate="10gbit", delay="0.1ms", limit=100000, both=True):
        """Shapes the host's link: what it sends and, with both, what it receives, each delayed by
        `delay` after serialization at `rate` (tc units: "10gbit", "0.2ms"; None: not that part).
        limit: queued packets (netem's default 1000 drops at 10gbit x 20ms). With shaping "netem":
        tc qdisc replace ... netem on the host's end and (both) on the bridge's end of its veth;
        with "userspace": the host's delay line (see _delayline)."""
        if self.shaping == "netem":
            args = ["root", "netem", "limit", str(limit)]
            if delay:
                args += ["delay", delay]
            if rate:
                args += ["rate", rate]
            _nsexec(self.ns(name), ["tc", "qdisc", "replace", "dev", self.veth(name)] + args)
            if both:
                _nsexec(self.bridge_ns, ["tc", "qdisc", "replace", "dev", self.bridge_port(name)] + args)
            else:
                _nsexec(self.bridge_ns, ["tc", "qdisc", "del", "dev", self.bridge_port(name), "root"], check=False)
        else:
            d, r = _parse_time(delay), _parse_rate(rate)
            p = self._delay_line(name)
            p.stdin.write(("%.9f %.1f %.9f %.1f %d\n" % (d, r, d if both else 0.0, r if both else 0.0, limit)).encode())
            p.stdin.flush()
            if p.stdout not in select.select([p.stdout], [], [], 10)[0] or p.stdout.readline().strip() != b"ok":
                raise RuntimeError("the delay line of %s did not take its new parameters" % name)

    def tbf(self, name, rate="10gbit", burst="4mb", latency="50ms"):
        """Caps the host's link at `rate` in both directions with tc tbf (in every kernel with tc;
        no added delay): for throughput runs on kernels without sch_netem, where the userspace delay
        line would be the bottleneck."""
        args = ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        _nsexec(self.ns(name), ["tc", "qdisc", "replace", "dev", self.veth(name)] + args)
        _nsexec(self.bridge_ns, ["tc", "qdisc", "replace", "dev", self.bridge_port(name)] + args)

    def clear_netem(self, name):
        if self.shaping == "netem":
            _nsexec(self.ns(name), ["tc", "qdisc", "del", "dev", self.veth(name), "root"], check=False)
            _nsexec(self.bridge_ns, ["tc", "qdisc", "del", "dev", self.bridge_port(name), "root"], check=False)
        elif name in self._lines:
            self.netem(name, rate=None, delay=None)

    def _delay_line(self, name):
        """The host's delay line, made on first use: the bridge's end of its veth leaves the bridge;
        a new veth pair (one end on the bridge) and a process forwarding between the two loose ends
        take its place. Frames still cross the host's veth (its counters count them)."""
        p = self._lines.get(name)
        if p is not None:
            return p
        i, bns = self._index[name], self.bridge_ns
        port, s, t = self.bridge_port(name), "%ss%d" % (self.tag, i), "%st%d" % (self.tag, i)
        _nsexec(bns, ["ip", "link", "add", s, "type", "veth", "peer", "name", t])
        _nsexec(bns, ["ip", "link", "set", s, "master", self.bridge, "up"])
        _nsexec(bns, ["ip", "link", "set", t, "promisc", "on", "up"])
        _nsexec(bns, ["ip", "link", "set", port, "nomaster"])
        _nsexec(bns, ["ip", "link", "set", port, "promisc", "on", "up"])
        p = subprocess.Popen(["ip", "netns", "exec", bns, sys.executable, os.path.abspath(__file__), "--delayline",
                              port, t], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._lines[name] = p
        r, _, _ = select.select([p.stdout], [], [], 10)
        if not r or p.stdout.readline().strip() != b"ready":
            raise RuntimeError("delay line of %s did not start: %s" % (name, p.stderr.read1(4000) if p.poll() is not None else "timeout"))
        return p

    def qdisc(self, name):
        """What shapes the host's link, in words."""
        if self.shaping == "netem":
            return _nsexec(self.ns(name), ["tc", "qdisc", "show", "dev", self.veth(name)]).stdout.strip()
        return "userspace delay line" if name in self._lines else "none"

    def link_bytes(self, name):
        """{"rx", "tx", "rx_packets", "tx_packets"} of the host's veth, counted inside its namespace."""
        j = json.loads(_nsexec(self.ns(name), ["ip", "-j", "-s", "link", "show", "dev", self.veth(name)]).stdout)
        s = j[0]["stats64"]
        return {"rx": s["rx"]["bytes"], "tx": s["tx"]["bytes"], "rx_packets": s["rx"]["packets"],
                "tx_packets": s["tx"]["packets"]}

    def tcp_sockets(self, name):
        """Established TCP sockets on the host: [{"local", "peer", "pid", "bytes_received", "bytes_sent"}]."""
        out = _nsexec(self.ns(name), ["ss", "-Htnpi", "state", "established"]).stdout.splitlines()
        socks, cur = [], None
        for line in out:
            f = line.split()
            if not line.startswith((" ", "\t")) and len(f) >= 4:
                m = re.search(r"pid=(\d+)", line)
                cur = {"local": f[2], "peer": f[3], "pid": int(m.group(1)) if m else None,
                       "bytes_received": 0, "bytes_sent": 0}
                socks.append(cur)
            elif cur is not None:
                for k in ("bytes_received", "bytes_sent"):
                    m = re.search(r"\b%s:(\d+)" % k, line)
                    if m:
                        cur[k] = int(m.group(1))
        return socks


# --- userspace delay line (kernels without sch_netem) -------------------------------------------------

SOL_PACKET, PACKET_VNET_HDR, PACKET_IGNORE_OUTGOING, ETH_P_ALL = 263, 15, 23, 3
VNET_HDR = 10  # struct virtio_net_hdr: GSO and checksum-offload state travel with each frame


def _parse_rate(s):
    """'10gbit' -> bits per second (tc's units); None/'' -> 0 (no limit)."""
    if not s:
        return 0.0
    m = re.match(r"^([0-9.]+)\s*([kmgt]?)(bit|bps)?$", str(s).lower())
    if not m:
        raise ValueError("rate %r" % s)
    v = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    return v * 8 if m.group(3) == "bps" else v


def _parse_time(s):
    """'0.2ms' / '20ms' / '1s' / '100us' -> seconds."""
    if not s:
        return 0.0
    m = re.match(r"^([0-9.]+)\s*(s|sec|ms|msec|us|usec)?$", str(s).lower())
    if not m:
        raise ValueError("time %r" % s)
    return float(m.group(1)) * {None: 1e-6, "s": 1, "sec": 1, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}[m.group(2)]


def _delayline(if_a, if_b):
    """--delayline A B: forwards every frame between interfaces A and B (raw packet sockets, GSO
    frames whole, with their virtio-net header), each direction delayed by `delay` after a
    serialization at `rate` (a FIFO per direction, at most `limit` frames queued: more are dropped,
    as netem does). Parameters come as lines "delay_AB rate_AB delay_BA rate_BA limit" (seconds, bits
    per second, 0 = none; frames) on stdin, each answered "ok" once in force; EOF ends it."""
    import collections
    import socket
    socks = []
    for name in (if_a, if_b):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: nothing arrives before bind
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)  # not our own sends
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        s.bind((name, ETH_P_ALL))
        socks.append(s)
    delay, rate, limit = [0.0, 0.0], [0.0, 0.0], 100000  # per direction: [A -> B, B -> A]
    q = [collections.deque(), collections.deque()]  # q[i]: frames from socks[i] to the other
    busy = [0.0, 0.0]                               # end of the last frame's serialization, per direction
    stdin = sys.stdin.buffer.raw
    buf = b""
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        now = time.monotonic()
        heads = [d[0][0] for d in q if d]
        timeout = max(0.0, min(heads) - now) if heads else None
        r, _, _ = select.select([socks[0], socks[1], stdin], [], [], timeout)
        for i, s in enumerate(socks):
            if s not in r:
                continue
            while True:
                try:
                    f = s.recv(1 << 18, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                now = time.monotonic()
                if len(q[i]) >= limit:
                    continue
                start = max(now, busy[i])
                busy[i] = start + ((len(f) - VNET_HDR) * 8 / rate[i] if rate[i] else 0.0)
                q[i].append((busy[i] + delay[i], f))
        if stdin in r:
            data = os.read(stdin.fileno(), 4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                v = line.split()
                delay, rate, limit = [float(v[0]), float(v[2])], [float(v[1]), float(v[3])], int(v[4])
                sys.stdout.write("ok\n")  # in force from now on
                sys.stdout.flush()
        now = time.monotonic()
        for i, d in enumerate(q):
            while d and d[0][0] <= now:
                try:
                    socks[1 - i].send(d.popleft()[1])
                except OSError:
                    pass  # a frame the kernel refuses (ENOBUFS): dropped, as on a full link


def _reap(tag):
    """--reap TAG: detach (fork; the parent exits at once), wait for EOF on stdin, then destroy(tag)."""
    if os.fork():
        os._exit(0)
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    destroy(tag)
    os._exit(0)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reap":
        _reap(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "--delayline":
        _delayline(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 2 and sys.argv[1] == "--cleanup":
        print("removed: %s" % (cleanup_stale() or "nothing"))
    else:
        ok, why = available()
        print("available" if ok else "not available: " + why)
        sys.exit(0 if ok else 1)
