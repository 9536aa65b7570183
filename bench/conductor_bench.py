#!/usr/bin/env python3
"""The conductor on a real cluster on this machine, every routing policy side by side
(docs/BENCHMARKS.md, "Conductor").

  conductor_bench.py real [--instances 2] [--policies conductor,cache-aware,round-robin,...]
                          [--skip 3393] [--limit 600] [--scale 64] [--speed 2] [--ttft-slo 2000] [--tbt-slo 200]
                          [--rounds 1] [--pin] [--calibration FILE] [--sim] [--out FILE]
      For each round and policy (interleaved: speed drifts by the minute): a fresh etcd, N instances
      (`larder serve --cluster`, 1 thread each, empty caches; --pin: instance i on core i % ncpu,
      else the cores are shared), `larder conductor --policy P` with the SLOs, then `larder replay`
      of the first --limit requests of the published trace (../shared/traces), scaled down by
      --scale, sped up by --speed, through the conductor (--skip: a later slice, where requests share
      more: the first requests of the trace share little with each other). Reports goodput (requests meeting both
      SLOs per second of trace time), completed, rejected (429), failed, prompt-cache hit rate and
      TTFT/TBT percentiles. With --sim, also `larder simulate` of the same slice with --calibration
      (from `larder calibrate`, measured on this machine with the instances' thread count) and the
      simulated/measured ratios of TTFT p50/p90 and hit rate.

  conductor_bench.py sim [--instances 16,32,64] [--speeds 1,2,4,8,16] [--calibration FILE]
                         [--ttft-slo 1000] [--tbt-slo 50] [--png docs/conductor_goodput.png]
      The whole trace on simulated clusters: every policy at every offered load (speed); goodput,
      hit rate and TTFT/TBT percentiles; a PNG of goodput vs offered load per policy (matplotlib; Debian's
      python3-matplotlib pulls in python3-brotli 1.0.9, whose old API breaks the openai client of
      tests/e2e_server_test.py on brotli-compressed answers: use a separate venv with PyPI matplotlib).

Larder's own commands are printed; nothing here builds or runs a peer.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import pdlib  # noqa: E402

POLICIES = ["conductor", "cache-aware", "least-load", "round-robin", "random"]


def shared():
    return os.environ.get("LARDER_SHARED") or os.path.join(HERE, "..", "..", "shared")


def trace_path():
    return os.path.join(shared(), "traces", "synthetic_trace.jsonl")


def sh(cmd):
    print("$ " + " ".join(cmd), flush=True)


def run_real(a):
    model = pdlib.model_path("smollm2")
    if not model:
        sys.exit("SmolLM2 is not cached (scripts/models smollm2)")
    ncpu = os.cpu_count() or 2
    results = []
    for rnd in range(a.rounds):
        for pol in a.policies.split(","):
            procs = []
            etcd = pdlib.Etcd()
            try:
                for i in range(a.instances):
                    prefix = ["taskset", "-c", str(i % ncpu)] if a.pin else []
                    args = ["-c", "4096", "--parallel", str(a.parallel), "--cluster", etcd.url(), "--cluster-ttl", "5"]
                    if a.kv_mem:
                        args += ["--kv-mem", a.kv_mem]
                    p = pdlib.serve(model, args, "i%d" % i, prefix=prefix, threads=str(a.threads))
                    procs.append(p)
                cargs = [pdlib.larder_bin(), "conductor", "--host", "127.0.0.1", "--port", "0", "-m", model,
                         "--cluster", etcd.url(), "--policy", pol, "--ttft-slo", str(a.ttft_slo),
                         "--tbt-slo", str(a.tbt_slo)]
                if a.calibration:
                    cargs += ["--calibration", a.calibration]
                cd = pdlib.Proc(cargs, "conductor", pattern=r"larder conductor: listening on http://[^:]+:(\d+)")
                cd.host = "127.0.0.1"
                procs.append(cd)
                time.sleep(1.0)
                rargs = [pdlib.larder_bin(), "replay", "--url", "http://127.0.0.1:%d" % cd.port, "--trace", trace_path(),
                         "--scale", str(a.scale), "--skip", str(a.skip), "--limit", str(a.limit), "--speed", str(a.speed), "--ttft-slo",
                         str(a.ttft_slo), "--tbt-slo", str(a.tbt_slo), "--json"]
                if rnd == 0 and pol == a.policies.split(",")[0]:
                    sh(["larder", "serve", "-m", model, "-t", str(a.threads)] + args)
                    sh(["larder"] + cargs[1:])
                    sh(["larder"] + rargs[1:])
                t0 = time.time()
                r = subprocess.run(rargs, capture_output=True, text=True, timeout=3600)
                if r.returncode != 0:
                    print("replay failed (%s): %s" % (pol, r.stderr[-1000:]), flush=True)
                    continue
                rep = json.loads(r.stdout)
                m = pdlib.metrics(cd)
                rep["policy"] = pol
                rep["round"] = rnd
                rep["wall_s"] = time.time() - t0
                rep["conductor_fetch_routes"] = m.get("larder_conductor_fetch_routes_total", 0)
                rep["conductor_ttft_abs_err_s"] = m.get("larder_conductor_ttft_prediction_abs_error_seconds", 0)
                # The cost model the conductor fitted during the run (the instances under this very
                # load, front door and load generator included): a calibration measured in situ.
                st, _, data = pdlib.req(cd.host, cd.port, "POST", "/internal/conductor/explain",
                                        {"request": {"prompt": "x", "max_tokens": 1}})
                fitted = [e for e in json.loads(data)["instances"].values() if e.get("cost_fitted")] if st == 200 else []
                if fitted and a.calibration:
                    cal = json.load(open(a.calibration))
                    keys = ("a", "b", "c", "d0", "d1", "d2")
                    cal["cost"] = {k: sum(e["cost"][k] for e in fitted) / len(fitted) for k in keys}
                    cal["measured_at"] = "fitted by the conductor during the %s run" % pol
                    rep["insitu_calibration"] = "/tmp/conductor_bench_insitu_%s.json" % pol
                    with open(rep["insitu_calibration"], "w") as f:
                        json.dump(cal, f)
                results.append(rep)
                print("%-12s round %d: goodput %.3f req/s, %d ok, %d rejected, %d failed, hit %.1f%%, TTFT p50 %.0f "
                      "p90 %.0f ms, TPOT p50 %.0f p90 %.0f ms, fetch routes %d (%.0f s)" % (
                          pol, rnd, rep.get("goodput_rps", 0), rep.get("ok", 0), rep.get("rejected", 0),
                          rep.get("failed", 0), 100 * (rep.get("hit_rate") or 0), 1000 * (rep["ttft_s"].get("p50") or 0),
                          1000 * (rep["ttft_s"].get("p90") or 0), 1000 * (rep["tpot_s"].get("p50") or 0),
                          1000 * (rep["tpot_s"].get("p90") or 0), rep["conductor_fetch_routes"], rep["wall_s"]),
                      flush=True)
                if a.sim and a.calibration:
                    for tag, calf in (("sim", a.calibration), ("sim_insitu", rep.get("insitu_calibration"))):
                        if not calf:
                            continue
                        sargs = [pdlib.larder_bin(), "simulate", "--trace", trace_path(), "--instances", str(a.instances),
                                 "--policy", pol, "--calibration", calf, "--scale", str(a.scale), "--skip", str(a.skip),
                                 "--limit", str(a.limit), "--speed", str(a.speed), "--ttft-slo", str(a.ttft_slo),
                                 "--tbt-slo", str(a.tbt_slo), "--json"]
                        s = subprocess.run(sargs, capture_output=True, text=True, timeout=600)
                        if s.returncode != 0:
                            continue
                        sim = json.loads(s.stdout)
                        rep[tag] = sim
                        ratio = lambda k, q: (sim["ttft_s"][q] / rep["ttft_s"][q]) if rep["ttft_s"].get(q) else float("nan")
                        print("    %-10s hit %.1f%% (x%.2f), TTFT p50 %.0f ms (x%.2f), p90 %.0f ms (x%.2f), goodput %.3f" % (
                            tag, 100 * sim["hit_rate"], sim["hit_rate"] / max(rep.get("hit_rate") or 1e-9, 1e-9),
                            1000 * sim["ttft_s"]["p50"], ratio(0, "p50"), 1000 * sim["ttft_s"]["p90"], ratio(0, "p90"),
                            sim["goodput_rps"]), flush=True)
            finally:
                for p in procs:
                    p.kill()
                etcd.close()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    # Mean per policy over rounds.
    print("\npolicy        goodput req/s   ok  rejected  hit %   TTFT p50/p90 ms   TPOT p50/p90 ms")
    by = {}
    for r in results:
        by.setdefault(r["policy"], []).append(r)
    for pol, rs in by.items():
        n = len(rs)
        g = sum(r.get("goodput_rps", 0) for r in rs) / n
        print("%-12s  %8.3f  %6.0f  %6.0f  %6.1f   %6.0f / %6.0f   %6.0f / %6.0f" % (
            pol, g, sum(r.get("ok", 0) for r in rs) / n, sum(r.get("rejected", 0) for r in rs) / n,
            100 * sum(r.get("hit_rate") or 0 for r in rs) / n, 1000 * sum(r["ttft_s"].get("p50") or 0 for r in rs) / n,
            1000 * sum(r["ttft_s"].get("p90") or 0 for r in rs) / n, 1000 * sum(r["tpot_s"].get("p50") or 0 for r in rs) / n,
            1000 * sum(r["tpot_s"].get("p90") or 0 for r in rs) / n))


def run_sim(a):
    rows = []
    for n in [int(x) for x in a.instances_list.split(",")]:
        for speed in [float(x) for x in a.speeds.split(",")]:
            for pol in POLICIES:
                sargs = [pdlib.larder_bin(), "simulate", "--trace", trace_path(), "--instances", str(n), "--policy", pol,
                         "--calibration", a.calibration, "--scale", str(a.scale), "--speed", str(speed), "--ttft-slo",
                         str(a.ttft_slo), "--tbt-slo", str(a.tbt_slo), "--json"]
                if not rows:
                    sh(["larder"] + sargs[1:])
                s = subprocess.run(sargs, capture_output=True, text=True, timeout=600)
                if s.returncode != 0:
                    print("simulate failed: %s" % s.stderr[-500:])
                    continue
                j = json.loads(s.stdout)
                j.update(instances=n, speed=speed, policy=pol)
                rows.append(j)
                print("%3d instances speed %5.1f %-12s goodput %.3f req/s, hit %.1f%%, rejected %s, TTFT p50 %.0f p90 %.0f "
                      "p99 %.0f ms, TBT p50 %.1f p99 %.1f ms" % (
                          n, speed, pol, j.get("goodput_rps", 0), 100 * (j.get("hit_rate") or 0), j.get("rejected"),
                          1000 * j["ttft_s"]["p50"], 1000 * j["ttft_s"]["p90"], 1000 * j["ttft_s"]["p99"],
                          1000 * j["tbt_s"]["p50"], 1000 * j["tbt_s"]["p99"]), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    if a.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        ns = sorted(set(r["instances"] for r in rows))
        fig, axes = plt.subplots(1, len(ns), figsize=(5 * len(ns), 4), squeeze=False)
        for ax, n in zip(axes[0], ns):
            for pol in POLICIES:
                pts = sorted((r["requests"] / r["trace_s"] if r.get("trace_s") else r["speed"], r.get("goodput_rps", 0))
                             for r in rows if r["instances"] == n and r["policy"] == pol)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol)
            ax.set_title("%d instances (simulated, trace / %d)" % (n, a.scale))
            ax.set_xlabel("offered load (req/s: the trace sped up 1x to %gx)" % max(r["speed"] for r in rows))
            ax.set_ylabel("goodput (req/s within TTFT %g ms, TBT %g ms)" % (a.ttft_slo, a.tbt_slo))
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(a.png, dpi=110)
        print("wrote %s" % a.png)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("real")
    r.add_argument("--instances", type=int, default=2)
    r.add_argument("--policies", default=",".join(POLICIES))
    r.add_argument("--limit", type=int, default=600)
    r.add_argument("--skip", type=int, default=3393)
    r.add_argument("--scale", type=int, default=64)
    r.add_argument("--speed", type=float, default=2)
    r.add_argument("--ttft-slo", type=float, default=2000)
    r.add_argument("--tbt-slo", type=float, default=200)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--parallel", type=int, default=4)
    r.add_argument("--kv-mem", default="")
    r.add_argument("--rounds", type=int, default=1)
    r.add_argument("--pin", action="store_true")
    r.add_argument("--calibration", default="")
    r.add_argument("--sim", action="store_true")
    r.add_argument("--out", default="")
    s = sub.add_parser("sim")
    s.add_argument("--instances", dest="instances_list", default="16,32,64")
    s.add_argument("--speeds", default="1,2,4,8,16")
    s.add_argument("--scale", type=int, default=32)
    s.add_argument("--calibration", required=True)
    s.add_argument("--ttft-slo", type=float, default=1000)
    s.add_argument("--tbt-slo", type=float, default=50)
    s.add_argument("--png", default="")
    s.add_argument("--out", default="")
    a = ap.parse_args()
    run_real(a) if a.cmd == "real" else run_sim(a)


if __name__ == "__main__":
    main()
