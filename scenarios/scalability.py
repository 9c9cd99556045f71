"""scalability: N token-by-token clients at once, with batched decode and without (scalability.toml).

The clients are coroutines on one asyncio loop in this process, each with its own AsyncClient and
session: a blocked thread per client would cost this process more CPU than the daemon's work on a
small model. The batch figures are the deltas of `status.scheduler.batches` over each point.
"""

import asyncio
import time

from djinnd import AsyncClient, format_size, percentile

from .common import Skip, prompt_ids, vocab_of
from .exp3_plan import crit
from .figures import figure


def needs_daemon(p: dict) -> bool:
    return True


def counts(p: dict) -> list[int]:
    try:
        ns = sorted({int(x) for x in p["clients"].split(",") if x.strip()})
    except ValueError:
        raise Skip(f"bad value for 'clients': {p['clients']!r} (comma-separated numbers)") from None
    if not ns or ns[0] < 1 or ns[-1] > 4096:
        raise Skip(f"bad value for 'clients': {p['clients']!r} (numbers 1-4096)")
    return ns


def run(ctx, p: dict):
    c = ctx.client
    st = ctx.status()
    model = st["model"]
    ctx.check_model(p["model"], model["name"])
    ns = counts(p)
    before = st["scheduler"].get("max_batch")
    if before is None:
        raise Skip("this daemon does not batch decode steps (no max_batch in its scheduler)")
    on = p["max_batch"] or before
    if on < 2:
        raise Skip(f"batching is off on this daemon (max_batch {before}); give max_batch=N to sweep with it")
    ctx.budget = st["memory"]["budget_bytes"]
    ctx.say(f"scalability: {', '.join(map(str, ns))} clients, {p['seconds']} s each, batched (max_batch {on}) "
            f"and unbatched; {model['name']} on {st['device']['kind']}")
    ctx.begin()
    vocab, sweeps, total = vocab_of(model), {}, 2 * len(ns)
    try:
        for mode, mb in (("batched", on), ("unbatched", 1)):
            c.set_scheduler(max_batch=mb)
            sweeps[mode] = []
            for n in ns:
                point = asyncio.run(_point(ctx, p, n, vocab))
                sweeps[mode].append(point)
                ctx.progress(sum(map(len, sweeps.values())), total,
                             f"{mode} {n} clients: {point['tokens_per_s']} tokens/s, p99 {point['latency_ms']['p99']} ms")
    finally:
        c.set_scheduler(max_batch=before)
    m = ctx.measure()
    png = _plot(ctx.folder / "scalability.png", sweeps, model["name"], st["device"]["kind"])
    return _verdict(ctx, p, sweeps, m, png)


async def _point(ctx, p: dict, n: int, vocab: int) -> dict:
    sock = ctx.client.socket_path
    clients = [AsyncClient(sock, timeout=300) for _ in range(n)]
    sids = []
    try:
        for i, cl in enumerate(clients):  # sessions prefilled and stepped once before the clock starts
            sids.append(await cl.create_session(token_ids=prompt_ids(p["seed"], i, p["prompt_len"], vocab)))
            ctx.sessions.add(sids[-1])
            await cl.generate(sids[-1], 1)
        b0 = ctx.client.status()["scheduler"]["batches"]
        latencies, errors = [], []
        stop = time.monotonic() + p["seconds"]

        async def decode(cl, sid):
            while time.monotonic() < stop:
                t = time.perf_counter()
                try:
                    await cl.generate(sid, 1)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(e).__name__}: {e}")
                    return
                latencies.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(decode(cl, sid) for cl, sid in zip(clients, sids)))
        wall = time.perf_counter() - t0
        b1 = ctx.client.status()["scheduler"]["batches"]
    finally:
        for cl, sid in zip(clients, sids):
            ctx.sessions.discard(sid)
            await cl.close(sid)
        for cl in clients:
            cl.close_socket()
    forwards, rows = b1["forwards"] - b0["forwards"], b1["rows"] - b0["rows"]
    return {"clients": n, "tokens": len(latencies), "wall_s": round(wall, 3),
            "tokens_per_s": round(len(latencies) / wall, 1),
            "latency_ms": {"p50": round(percentile(latencies, 50) or 0, 3), "p99": round(percentile(latencies, 99) or 0, 3)},
            "forwards": forwards, "mean_batch": round(rows / forwards, 2) if forwards else None, "errors": errors[:5]}


def _plot(path, sweeps: dict, model: str, device: str) -> str:
    with figure(path, 1, 2, title=f"djinnd decode under load: {model} on {device}", size=(11, 4.2)) as (tp, lat):
        for mode, points in sweeps.items():
            xs = [q["clients"] for q in points]
            style = "-o" if mode == "batched" else "--s"
            tp.plot(xs, [q["tokens_per_s"] for q in points], style, label=mode)
            lat.plot(xs, [q["latency_ms"]["p50"] for q in points], style, label=f"{mode} p50")
            lat.plot(xs, [q["latency_ms"]["p99"] for q in points], style, alpha=0.5, label=f"{mode} p99")
        for ax, title, unit in ((tp, "total throughput", "tokens/s"), (lat, "per-token latency", "ms")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(unit)
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.legend()
        lat.set_yscale("log")
    return str(path)


def _verdict(ctx, p: dict, sweeps: dict, m: dict, png: str):
    points = [q for s in sweeps.values() for q in s]
    bad = [q for q in points if q["errors"] or not q["tokens"]]
    criteria = [crit(ctx, "all_complete", f"{len(points) - len(bad)} of {len(points)} points"
                     + (f"; {bad[0]['clients']} clients: {(bad[0]['errors'] or ['no token'])[0]}" if bad else ""),
                     not bad)]
    ref = ctx.scenario.criteria["speedup"]
    k, want = ref["clients"], ref["min_speedup"]
    by = {mode: {q["clients"]: q for q in s} for mode, s in sweeps.items()}
    on, off = by["batched"], by["unbatched"]
    if k in on and 1 in on and k in off:
        ratio = on[k]["tokens_per_s"] / on[1]["tokens_per_s"] if on[1]["tokens_per_s"] else 0.0
        criteria.append(crit(ctx, "speedup", f"{k} clients: {on[k]['tokens_per_s']} tokens/s, one client "
                             f"{on[1]['tokens_per_s']}: {ratio:.2f}x (needs {want}x); mean batch {on[k]['mean_batch']}",
                             ratio >= want))
        criteria.append(crit(ctx, "beats_unbatched", f"{k} clients: batched {on[k]['tokens_per_s']} tokens/s, "
                             f"unbatched {off[k]['tokens_per_s']} ({on[k]['tokens_per_s'] / max(off[k]['tokens_per_s'], 1e-9):.2f}x)",
                             on[k]["tokens_per_s"] > off[k]["tokens_per_s"]))
    else:
        for cid in ("speedup", "beats_unbatched"):
            criteria.append(crit(ctx, cid, f"needs 1 and {k} clients in the sweep", None))
    for mode, s in sweeps.items():
        ctx.say(f"{mode}: " + "; ".join(f"{q['clients']}: {q['tokens_per_s']} tok/s p99 {q['latency_ms']['p99']} ms"
                                        + (f" (batch {q['mean_batch']})" if mode == "batched" else "") for q in s))
    n = max(q["clients"] for q in points)
    body = {"capacity_math": {"sessions": n, "budget_bytes": ctx.budget, "budget": format_size(ctx.budget)},
            "num_sessions_requested": sum(q["clients"] for q in points),
            "num_sessions_spawned": sum(q["clients"] for q in points),
            "num_sessions_completed": sum(q["clients"] for q in points if not q["errors"]),
            "sweeps": sweeps, "figure": png, **m,
            "integrity": {"checked_sessions": 0, "mismatches": 0}}
    return body, criteria
