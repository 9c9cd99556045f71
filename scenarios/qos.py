"""qos: realtime, interactive and batch clients under overload, with the QoS policy on and off (qos.toml).

Every client has its own session (created and prefilled up front, so every timed request is k
decode steps) and its own thread and Client. Each request is one generate(sid, k) round trip,
timed by the client; every decode step waits for the device on its own, so the scheduler chooses
between the classes at each token. Batch clients never pause, so the device always has a queue.
The think times come from one seeded RNG, so both modes replay the same workload.

The daemon's scheduler is switched with `scheduler.set` (on: fcfs=false with the given shares, LIFO
and escalation; off: fcfs=true) and put back as it was at the end. Device-time shares per class come
from the deltas of `status.scheduler.busy_s`.
"""

import random
import threading
import time

from djinnd import DjinnError, estimate, format_size, parse_shares, percentile

from .common import Skip, prompt_ids, vocab_of
from .figures import figure

CLASSES = ("realtime", "interactive", "batch")
CLIENT_TIMEOUT = 300.0


def needs_daemon(p: dict) -> bool:
    return True


REFERENCE = {"shares": "realtime=0.1,interactive=0.7,batch=0.2", "max_concurrency": 12, "escalation_ms": 300.0}


def reference(p: dict) -> dict:
    """The reference experiment's settings (EXPERIMENTS.md, 4.2) and where this run's differ."""
    return {**REFERENCE, "this_run_differs": {k: p[k] for k, v in REFERENCE.items() if p[k] != v}}


def on_settings(p: dict) -> dict:
    """scheduler.set parameters for QoS on (checked here, so a bad value is one clear line)."""
    shares = p["shares"].strip()
    if shares.lower() in ("none", "", "priority"):
        shares = ""
    else:
        try:
            parse_shares(shares)
        except ValueError as e:
            raise Skip(f"bad value for 'shares': {e}") from None
    esc = p["escalation_ms"]
    return {"fcfs": False, "shares": shares, "lifo": p["lifo"], "escalation_ms": None if esc == "none" else esc}


def off_settings(p: dict) -> dict:
    return {"fcfs": True, "lifo": False}


def restore_settings(fig: dict) -> dict:
    """scheduler.set parameters that put back the figures `status.scheduler` showed."""
    return {"fcfs": fig["policy"] == "fcfs", "shares": fig["shares"] or "", "lifo": fig["lifo"],
            "escalation_ms": fig["escalation_ms"], "max_concurrency": fig["max_concurrency"],
            **({"max_batch": fig["max_batch"]} if "max_batch" in fig else {})}


def clients_of(p: dict) -> list[dict]:
    """Every client: class, index, and its think times (ms) from one seeded RNG."""
    rng = random.Random(p["seed"])
    out = []
    for cls in CLASSES:
        mean = p[f"think_{cls}_ms"]
        for j in range(p[cls]):
            thinks = [rng.expovariate(1 / mean) if mean > 0 else 0.0 for _ in range(p["requests"])]
            out.append({"client": len(out) + 1, "qos": cls, "thinks_ms": thinks})
    return out


def run_mode(ctx, p: dict, mode: str, clients: list[dict], vocab: int, progress) -> dict:
    c = ctx.client
    settings = on_settings(p) if mode == "on" else off_settings(p)
    if p["max_concurrency"]:
        settings["max_concurrency"] = p["max_concurrency"]
    if p["max_batch"]:
        settings["max_batch"] = p["max_batch"]
    sched = c.set_scheduler(**settings)
    # sessions up front, prefilled: every timed request is k decode steps
    sids = {}
    for cl in clients:
        sid = ctx.create_session(token_ids=prompt_ids(p["seed"], cl["client"], p["prompt_len"], vocab), qos=cl["qos"])
        c.generate(sid, 1)
        sids[cl["client"]] = sid
    st0 = c.status()
    start = threading.Barrier(len(clients) + 1)
    records, lock = [], threading.Lock()

    def client_main(cl):
        rec = {"client": cl["client"], "qos": cl["qos"], "latency_ms": [], "tokens": [], "error": None, "end_s": None}
        with c.twin(CLIENT_TIMEOUT) as cc:
            start.wait()
            try:
                for think in cl["thinks_ms"]:
                    if think:
                        time.sleep(think / 1000)
                    t = time.perf_counter()
                    rec["tokens"] += cc.generate(sids[cl["client"]], p["tokens"])
                    rec["latency_ms"].append(round((time.perf_counter() - t) * 1000, 3))
            except DjinnError as e:
                rec["error"] = f"{e.code}: {e}"
        rec["end_s"] = time.perf_counter()
        with lock:
            records.append(rec)
            progress(mode, rec)

    threads = [threading.Thread(target=client_main, args=(cl,), name=f"qos-client-{cl['client']}", daemon=True)
               for cl in clients]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    st1 = c.status()
    for sid in sids.values():
        ctx.close_session(sid)

    s0, s1 = st0["scheduler"], st1["scheduler"]
    busy = {k: s1["busy_s"][k] - s0["busy_s"][k] for k in CLASSES}
    busy_total = sum(busy.values())
    per_class = {}
    for cls in CLASSES:
        recs = [r for r in records if r["qos"] == cls]
        if not recs:
            continue
        lat = [x for r in recs for x in r["latency_ms"]]
        sla = p.get(f"sla_{cls}_ms")
        viol = sum(x > sla for x in lat) if sla is not None else None
        tokens = sum(len(r["tokens"]) for r in recs)
        span = max(r["end_s"] for r in recs) - t0  # the class's own span: it may finish before the others
        per_class[cls] = {
            "clients": len(recs), "requests": len(lat), "requests_expected": len(recs) * p["requests"],
            "failed_clients": sum(r["error"] is not None for r in recs),
            "latency_ms": {"p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99),
                           "max": max(lat) if lat else None, "mean": round(sum(lat) / len(lat), 3) if lat else None},
            "sla_ms": sla, "sla_violations": viol,
            "sla_violation_rate": round(viol / len(lat), 4) if viol is not None and lat else None,
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
            "tokens_per_s_own_span": round(tokens / span, 2) if span > 0 else None,
            "device_s": round(busy[cls], 4),
            "device_share": round(busy[cls] / busy_total, 4) if busy_total > 0 else None,
            "forwards": s1["served"][cls] - s0["served"][cls],
        }
    errors = [f"client {r['client']} ({r['qos']}): {r['error']}" for r in records if r["error"]]
    records.sort(key=lambda r: r["client"])
    return {"mode": mode, "scheduler": {k: sched.get(k) for k in ("policy", "max_concurrency", "lifo",
                                                                  "escalation_ms", "shares")},
            "classes": per_class, "wall_s": round(wall, 3),
            "requests": sum(len(r["latency_ms"]) for r in records),
            "requests_expected": len(clients) * p["requests"], "errors": errors[:10], "records": records}


def run(ctx, p: dict):
    c = ctx.client
    st = ctx.status()
    model = st["model"]
    ctx.check_model(p["model"], model["name"])
    if "scheduler" not in st:
        raise Skip("this daemon reports no scheduler (no QoS classes)")
    clients = clients_of(p)
    if not clients:
        raise Skip("no clients: give at least one of realtime, interactive, batch")
    modes = ["on", "off"] if p["qos"] == "both" else [p["qos"]]
    on_settings(p)  # a bad 'shares' is a Skip before anything changes
    # capacity: every client's session (prompt + decoded tokens) resident at once, with room to spare
    weights = model["weights_bytes"]
    est = estimate(model, p["prompt_len"], 1 + p["requests"] * p["tokens"])
    cap, kv = est["kv_capacity_tokens"], est["kv_bytes"]
    demand = weights + len(clients) * kv
    budget = {"auto": weights + 2 * len(clients) * kv,
              "daemon": st["memory"]["budget_bytes"]}.get(p["budget"], p["budget"])
    if p["budget"] == "auto":
        budget = max(budget, st["memory"]["budget_bytes"])  # roomy: never below what the daemon has
    math = {"weights_bytes": weights, "kv_bytes_per_session": kv, "kv_capacity_tokens": cap,
            "sessions": len(clients), "demand_bytes": demand, "budget_bytes": budget,
            "expected_swapping": demand > budget}
    if budget != st["memory"]["budget_bytes"]:
        ctx.set_budget(budget)
    ctx.budget = budget
    counts = ", ".join(f"{p[k]} {k}" for k in CLASSES)
    ctx.say(f"qos: {counts} clients, {p['requests']} requests of {p['tokens']} tokens each; modes {', '.join(modes)}; "
            f"budget {format_size(budget)} for a demand of {format_size(demand)}")
    differs = reference(p)["this_run_differs"]
    ctx.say("  reference settings (shares 0.1/0.7/0.2, max concurrency 12, escalation 300 ms)"
            + (": this run differs in " + ", ".join(f"{k} {v}" for k, v in differs.items()) if differs else ""))
    vocab = vocab_of(model)
    before = st["scheduler"]
    try:
        c.set_scheduler(fcfs=before["policy"] == "fcfs")  # probe: a daemon without scheduler.set
    except DjinnError as e:
        if e.code == "unknown_method":
            raise Skip("this daemon cannot change its scheduler (no scheduler.set)") from None
        raise

    ctx.begin()
    total = len(clients) * len(modes)

    def progress(mode, rec):  # from the client threads
        ctx.advance(total, f"qos {mode}: client {rec['client']} ({rec['qos']}) done")

    runs = {}
    try:
        for mode in modes:
            runs[mode] = run_mode(ctx, p, mode, clients, vocab, progress)
            ctx.say(f"qos {mode}: " + "; ".join(
                f"{cls} p50 {f['latency_ms']['p50']} ms p99 {f['latency_ms']['p99']} ms, "
                f"{f['device_share']} of the device" for cls, f in runs[mode]["classes"].items())
                + f"; {runs[mode]['wall_s']} s")
    finally:
        c.set_scheduler(**restore_settings(before))
    m = ctx.measure()
    png = _plot(ctx.folder / "qos.png", runs, f"qos: {counts} clients of {model['name']}, "
                f"{p['tokens']} tokens a request")
    body, crit = summarize(ctx, p, math, modes, runs, clients, m)
    if png:
        body["figure"] = png
    return body, crit


def _plot(path, runs: dict, title: str) -> str | None:
    """Each class's request latency, QoS on beside off: what the scheduler buys realtime and costs batch."""
    classes = [cls for cls in CLASSES if any(cls in r["classes"] for r in runs.values())]
    if not classes:
        return None
    width = 0.8 / len(runs)
    with figure(path, 1, 2, title=title, size=(10, 4.2)) as axes:
        for ax, q in zip(axes, ("p50", "p99")):
            for k, (mode, r) in enumerate(runs.items()):
                xs = [i + (k - (len(runs) - 1) / 2) * width for i in range(len(classes))]
                ys = [(r["classes"][cls]["latency_ms"][q] or 0) if cls in r["classes"] else 0 for cls in classes]
                bars = ax.bar(xs, ys, width, label=f"QoS {mode} ({r['scheduler']['policy']})")
                ax.bar_label(bars, fmt="%.0f", fontsize="small")
            ax.set_xticks(range(len(classes)), classes)
            ax.set_ylabel("ms")
            ax.set_title(f"{q} request latency")
            ax.grid(True, axis="y", alpha=0.3)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
            ax.legend(loc="upper center", ncols=2, fontsize="small")
    return str(path)


def summarize(ctx, p, math, modes, runs, clients, m):
    crit = []

    def add(cid, measured, ok):
        crit.append({"id": cid, "text": ctx.scenario.criteria[cid]["text"], "measured": measured, "ok": ok})

    parts = [f"{mode}: {r['requests']}/{r['requests_expected']} requests"
             + (f" ({r['errors'][0]})" if r["errors"] else "") for mode, r in runs.items()]
    add("all_complete", "; ".join(parts), all(r["requests"] == r["requests_expected"] for r in runs.values()))

    def p99(mode, cls):
        f = runs[mode]["classes"].get(cls)
        return f["latency_ms"]["p99"] if f else None

    if "on" in runs and p99("on", "realtime") is not None and p99("on", "batch") is not None:
        rt, b = p99("on", "realtime"), p99("on", "batch")
        f = runs["on"]["classes"]["realtime"]
        add("qos_on_realtime_first", f"realtime p99 {rt} ms vs batch p99 {b} ms; realtime SLA violations "
            f"{f['sla_violations']}/{f['requests']}", rt < b)
    else:
        add("qos_on_realtime_first", "needs QoS on and both realtime and batch clients", None)
    ratio = ctx.scenario.criteria["fcfs_no_favour"]["min_ratio"]
    if "off" in runs and p99("off", "realtime") is not None and p99("off", "batch") is not None:
        rt, b = p99("off", "realtime"), p99("off", "batch")
        add("fcfs_no_favour", f"realtime p99 {rt} ms vs batch p99 {b} ms (ratio {rt / b:.2f}, needs {ratio})"
            if b else f"realtime p99 {rt} ms, batch p99 {b} ms", b is not None and rt >= ratio * b)
    else:
        add("fcfs_no_favour", "needs QoS off and both realtime and batch clients", None)

    # the same prompts decode the same tokens whatever the order they were served in
    checked, mismatches = 0, 0
    if len(runs) > 1:
        by_client = [{r["client"]: r["tokens"] for r in run["records"] if not r["error"]} for run in runs.values()]
        for cid in set.intersection(*(set(b) for b in by_client)):
            checked += 1
            mismatches += any(b[cid] != by_client[0][cid] for b in by_client[1:])

    headline = {}
    for mode in runs:
        for cls in ("realtime", "batch"):
            if p99(mode, cls) is not None:
                headline[f"{mode}_{cls}_p99_ms"] = p99(mode, cls)
    figures = {mode: {k: v for k, v in r.items() if k != "records"} for mode, r in runs.items()}
    clients_out = {mode: [{k: v for k, v in rec.items() if k not in ("tokens", "end_s")} for rec in r["records"]]
                   for mode, r in runs.items()}
    n = len(clients) * len(runs)
    done = sum(1 for r in runs.values() for rec in r["records"] if not rec["error"])
    body = {"params": {**p, "budget": math["budget_bytes"], "budget_rule": p["budget"]}, "capacity_math": math,
            "modes": figures, "clients": clients_out,
            "num_sessions_requested": n, "num_sessions_spawned": n, "num_sessions_completed": done,
            "integrity": {"checked_sessions": checked, "mismatches": mismatches},
            "reference": reference(p), "headline": headline, **m}
    return body, crit
