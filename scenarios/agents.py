"""agents: the semantic scheduler against swapping on demand, with agents that wait on tools (agents.toml).

One seeded draw gives every agent its arrival time (a Poisson process) and its tool times, so
every policy replays the same workload. Agent i starts at its arrival time in its own thread, with
its own Client (zmq sockets are not thread-safe): it creates a session of prompt_len tokens, then
runs `turns` turns; each turn times generate(sid, 1) (the first token) and then decodes k-1 more.
Between turns it waits its tool time; under `semantic` it says so first with
signal_phase(IO_WAIT, expected_ms) and signal_phase(COMPUTE, wait=False) when the tool is done (a
hint: sent, not waited for, as an agent runtime would). The wake-up latency runs from the end of
the tool wait to the return of the next turn's first token, so it includes sending the COMPUTE
signal and any swap-in on the way.

Every figure is a delta of the daemon's counters over the policy's run (swaps, prefetch hits and
misses) or measured by the agents; swap-ins are split by the daemon's reason: `demand` and
`compute` ones sit on a wake-up's critical path, `prefetch` ones do not. agents.png draws the
wake-up latency CDF of each policy, the distribution behind the P99 criterion.
"""

import random
import threading
import time

from djinnd import DjinnError, estimate, format_size, percentile

from .common import Skip, prompt_ids, vocab_of
from .figures import figure

POLICIES = ("semantic", "reactive", "hold")
ON_THE_WAKE_UP_PATH = ("demand", "compute")  # swap-in reasons a request waits for (prefetch ones it does not)
CLIENT_TIMEOUT = 300.0
STOP_WAIT_S = 10.0  # how long an interrupted run waits for its agents to close their sessions
REFERENCE_RATE = 0.2  # agents a second in the reference experiment (EXPERIMENTS.md)


def needs_daemon(p: dict) -> bool:
    return True


# -- the capacity math ---------------------------------------------------------------------------
def capacity_math(model: dict, p: dict, budget: int) -> dict:
    """An idle agent holds its KV slab; the one computing holds its activations too (the prefill's
    are the largest). Demand: every agent live at once."""
    n, decoded = p["agents"], p["turns"] * p["decode_tokens"]
    weights = model["weights_bytes"]
    est = estimate(model, p["prompt_len"], decoded)
    kv_tokens, kv, act = est["kv_capacity_tokens"], est["kv_bytes"], est["activation_bytes"]
    demand = weights + n * kv + act
    fit = max(0, (budget - weights - act) // kv) if kv else n
    return {"weights_bytes": weights, "kv_bytes_per_session": kv, "kv_capacity_tokens": kv_tokens,
            "activation_bytes_per_prefill": act, "bytes_per_session": kv, "sessions": n,
            "demand_bytes": demand, "budget_bytes": budget, "expected_swapping": demand > budget,
            "sessions_that_fit": min(fit, n), "demand_over_budget": round(demand / budget, 3) if budget else None}


def resolve_budget(p: dict, model: dict, daemon_budget: int) -> int:
    if p["budget"] == "auto":
        m = capacity_math(model, p, 0)
        return m["weights_bytes"] + m["activation_bytes_per_prefill"] + int(
            p["budget_fraction"] * p["agents"] * m["kv_bytes_per_session"])
    if p["budget"] == "daemon":
        return daemon_budget
    return p["budget"]


def math_lines(m: dict) -> list[str]:
    f = format_size
    lines = [
        f"weights          {f(m['weights_bytes'])}",
        f"per agent        KV {m['kv_capacity_tokens']} tokens = {f(m['kv_bytes_per_session'])}"
        f" (+ {f(m['activation_bytes_per_prefill'])} of activations while it prefills)",
        f"demand           {f(m['weights_bytes'])} + {m['sessions']} x {f(m['kv_bytes_per_session'])}"
        f" + {f(m['activation_bytes_per_prefill'])} = {f(m['demand_bytes'])} with every agent live",
        f"budget           {f(m['budget_bytes'])}: {m['sessions_that_fit']} agents fit beside the weights"
        + (f" ({m['demand_over_budget']:.2f}x over with all live)" if m["expected_swapping"] else " (all fit)"),
    ]
    return lines


# -- the workload ------------------------------------------------------------------------------------
def draw(p: dict) -> list[dict]:
    """Arrival times (s) and tool times (ms) of every agent, from one seeded RNG."""
    rng = random.Random(p["seed"])
    t, agents = 0.0, []
    for i in range(p["agents"]):
        if i:
            t += rng.expovariate(p["arrival_rate"])
        tools = [max(p["tool_ms_min"], rng.expovariate(1 / p["tool_ms"]) if p["tool_ms"] > 0 else 0.0)
                 for _ in range(p["turns"] - 1)]
        agents.append({"agent": i + 1, "arrival_s": t, "tools_ms": tools})
    return agents


class Live:
    """Agents admitted (prefilled) and not yet closed; the most at once."""

    def __init__(self):
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def enter(self):
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self):
        with self._lock:
            self.now -= 1


def run_agent(ctx, p: dict, policy: str, a: dict, vocab: int, live: Live, done, t0: float, stop) -> dict:
    """One agent's life; its record (status, first-token and wake-up latencies, tokens). It ends at
    its next step once `stop` is set (the run was interrupted), closing its session."""
    k = p["decode_tokens"]
    rec = {"agent": a["agent"], "status": "failed", "started_s": None, "first_token_ms": None, "wakeups_ms": [],
           "wake_at_s": [], "compute_signal_ms": [], "wake_windows": [], "tokens": [], "error": None}
    ids = prompt_ids(p["seed"], a["agent"], p["prompt_len"], vocab)
    sid, admitted = None, False
    with ctx.client.twin(CLIENT_TIMEOUT) as c:
        try:
            t_start = time.perf_counter()
            rec["started_s"] = round(t_start - t0, 4)  # since the policy's first arrival
            sid = c.create_session(token_ids=ids, qos="interactive")
            ctx.sessions.add(sid)
            for turn in range(p["turns"]):
                if stop.is_set():
                    raise DjinnError("aborted", "the run was interrupted")
                if turn:
                    tool = a["tools_ms"][turn - 1]
                    if policy == "semantic":
                        c.signal_phase(sid, "IO_WAIT", expected_ms=tool if p["hint"] == "exact" else p["tool_ms"])
                    if stop.wait(tool / 1000):
                        raise DjinnError("aborted", "the run was interrupted")
                    t_end = time.perf_counter()
                    if policy == "semantic" and p["compute_signal"]:
                        c.signal_phase(sid, "COMPUTE", wait=False)
                        rec["compute_signal_ms"].append(round((time.perf_counter() - t_end) * 1000, 3))
                else:
                    t_end = t_start
                toks = c.generate(sid, 1)
                t_first = time.perf_counter()
                ms = (t_first - t_end) * 1000
                if turn:
                    rec["wakeups_ms"].append(round(ms, 3))
                    rec["wake_at_s"].append(round(t_end - t0, 4))
                    now_ns = time.monotonic_ns()
                    rec["wake_windows"].append((sid, now_ns - int((t_first - t_end) * 1e9), now_ns))
                else:
                    rec["first_token_ms"] = round(ms, 3)
                    admitted = True
                    live.enter()
                if k > 1:
                    toks += c.generate(sid, k - 1)
                rec["tokens"] += toks
            rec["status"] = "completed"
        except DjinnError as e:
            if not admitted and policy == "hold" and e.code == "out_of_budget":
                rec["status"] = "rejected"
            rec["error"] = f"{e.code}: {e}"
        finally:
            if admitted:
                live.leave()
            if sid is not None:
                try:
                    c.close(sid)
                except DjinnError:
                    pass
                ctx.sessions.discard(sid)
    rec["admitted"] = admitted
    done(rec)
    return rec


def run_policy(ctx, p: dict, policy: str, workload: list[dict], vocab: int, progress) -> dict:
    c = ctx.client
    swap_was = c.status()["memory"].get("swap_enabled", True)
    if policy == "hold":
        ctx.set_swap(False)  # the harness puts the daemon's setting back after the run, whatever happens
    st0 = c.status()
    live, records, threads = Live(), [], []
    lock, stop = threading.Lock(), threading.Event()

    def done(rec):
        with lock:
            records.append(rec)
        progress(policy, rec)

    t0_ns = time.monotonic_ns()
    t0 = time.perf_counter()
    try:
        for a in workload:
            delay = t0 + a["arrival_s"] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            th = threading.Thread(target=run_agent, args=(ctx, p, policy, a, vocab, live, done, t0, stop),
                                  name=f"agent-{a['agent']}", daemon=True)
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
    except BaseException:  # Ctrl-C or SIGTERM: each agent closes its own session at its next step, even one
        stop.set()         # whose create was in flight (the cleanup cannot know it), before the run ends
        deadline = time.monotonic() + STOP_WAIT_S
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        raise
    finally:
        wall = time.perf_counter() - t0
        if policy == "hold":
            c.set_swap(swap_was)
    st1 = c.status()
    t1_ns = time.monotonic_ns()
    seq = progress(policy, None)  # its event marks the end: the recorder has every swap event before it
    if ctx.recorder is not None and seq:
        ctx.recorder.wait_for(seq)
    swaps = [e for e in ctx.log.of_type("swap_in", "swap_out", since_ns=t0_ns) if e["mono_ns"] <= t1_ns]
    reasons: dict[str, int] = {}
    for e in swaps:
        key = f"{e['type']}:{e.get('reason')}"
        reasons[key] = reasons.get(key, 0) + 1

    records.sort(key=lambda r: r["agent"])
    # wake-ups that paid a swap-in: one of the session's demand/compute swap-ins inside the wake-up's window
    paid_ins = [e for e in swaps if e["type"] == "swap_in" and e.get("reason") in ON_THE_WAKE_UP_PATH]
    paid = 0
    for r in records:
        for sid, a_ns, b_ns in r.pop("wake_windows"):
            paid += any(e["session"] == sid and a_ns <= e["mono_ns"] <= b_ns for e in paid_ins)
    wake = [ms for r in records for ms in r["wakeups_ms"]]
    first = [r["first_token_ms"] for r in records if r["first_token_ms"] is not None]
    sig = [ms for r in records for ms in r["compute_signal_ms"]]
    completed = sum(r["status"] == "completed" for r in records)
    tokens = sum(len(r["tokens"]) for r in records)
    d = {k: st1["swap"].get(k, 0) - st0["swap"].get(k, 0)
         for k in ("swap_outs", "swap_ins", "bytes_out", "bytes_in", "prefetch_scheduled", "prefetch_done",
                   "prefetch_hits", "prefetch_misses")}
    wake_jumps = st1["scheduler"].get("wake_jumps", 0) - st0["scheduler"].get("wake_jumps", 0)
    settled = d["prefetch_hits"] + d["prefetch_misses"]
    n = len(workload)
    errors = [f"agent {r['agent']}: {r['error']}" for r in records if r["status"] == "failed"]
    return {
        "policy": policy, "agents": n, "admitted": sum(r["admitted"] for r in records),
        "rejected": sum(r["status"] == "rejected" for r in records), "completed": completed,
        "failed": len(errors), "success_rate": round(completed / n, 4) if n else None,
        "peak_live_agents": live.peak, "wakeups": len(wake),
        "wakeup_ms": {"p50": percentile(wake, 50), "p90": percentile(wake, 90), "p99": percentile(wake, 99),
                      "max": max(wake) if wake else None,
                      "mean": round(sum(wake) / len(wake), 3) if wake else None},
        "first_token_ms": {"p50": percentile(first, 50), "p99": percentile(first, 99)},
        "compute_signal_ms": {"p50": percentile(sig, 50), "p99": percentile(sig, 99)} if sig else None,
        "swap_outs": d["swap_outs"], "swap_ins": d["swap_ins"], "bytes_out": d["bytes_out"], "bytes_in": d["bytes_in"],
        "wakeups_that_swapped_in": paid, "swap_ins_on_demand": len(paid_ins),
        "wake_jumps": wake_jumps,  # first steps after a tool wait served ahead of an older decode step
        "swaps_by_reason": dict(sorted(reasons.items())),
        "prefetch": {"scheduled": d["prefetch_scheduled"], "done": d["prefetch_done"], "hits": d["prefetch_hits"],
                     "misses": d["prefetch_misses"],
                     "hit_rate": round(d["prefetch_hits"] / settled, 4) if settled else None},
        "tokens": tokens, "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None, "wall_s": round(wall, 3),
        "errors": errors[:10], "records": records,
    }


# -- the run -----------------------------------------------------------------------------------------
def run(ctx, p: dict):
    c = ctx.client
    st = ctx.daemon_status(p["model"])
    model = st["model"]
    budget = resolve_budget(p, model, st["memory"]["budget_bytes"])
    math = capacity_math(model, p, budget)
    policies = list(POLICIES) if p["policy"] == "all" else [p["policy"]]
    ctx.say(f"agents: {p['agents']} agents of {model['name']} arriving at {p['arrival_rate']}/s, {p['turns']} turns of "
            f"{p['decode_tokens']} tokens, tool waits of {p['tool_ms']:g} ms on average; "
            f"policies {', '.join(policies)}; arrivals {p['arrival_rate'] / REFERENCE_RATE:g}x the reference's "
            f"{REFERENCE_RATE}/s")
    for line in math_lines(math):
        ctx.say("  " + line)
    one = math["weights_bytes"] + math["kv_bytes_per_session"] + math["activation_bytes_per_prefill"]
    if budget < one:
        raise Skip(f"budget {format_size(budget)} is too small for even one agent: weights "
                   f"{format_size(math['weights_bytes'])} + KV {format_size(math['kv_bytes_per_session'])} + "
                   f"prefill activations {format_size(math['activation_bytes_per_prefill'])} = {format_size(one)}")
    if budget != st["memory"]["budget_bytes"]:
        ctx.set_budget(budget)
    ctx.budget = budget
    vocab = vocab_of(model)
    workload = draw(p)

    # warm-up (not measured): the first forwards of a fresh daemon pay one-off costs
    sid = ctx.create_session(token_ids=prompt_ids(p["seed"], 0, p["prompt_len"], vocab))
    c.generate(sid, 1)
    c.generate(sid, max(1, p["decode_tokens"] - 1))
    ctx.close_session(sid)

    ctx.begin()
    total = len(workload) * len(policies)

    def progress(policy, rec):  # from the agent threads
        if rec is None:  # the policy is done: the event's seq
            return ctx.event("progress", done=ctx.done, total=total, message=f"{policy} finished")
        ctx.advance(total, f"{policy}: agent {rec['agent']} {rec['status']}")

    runs = {}
    for policy in policies:
        runs[policy] = run_policy(ctx, p, policy, workload, vocab, progress)
        r = runs[policy]
        ctx.say(f"{policy}: {r['completed']}/{r['agents']} completed, wake-up p50 {r['wakeup_ms']['p50']} ms "
                f"p99 {r['wakeup_ms']['p99']} ms, {r['swap_outs']} swap-outs, {r['swap_ins']} swap-ins "
                f"({r['swap_ins_on_demand']} on demand; {r['wakeups_that_swapped_in']} of {r['wakeups']} wake-ups "
                f"swapped in), prefetch hits {r['prefetch']['hits']} "
                f"misses {r['prefetch']['misses']}, {r['wake_jumps']} wake-ups served ahead of older steps, "
                f"at most {r['peak_live_agents']} agents live, "
                f"{r['tokens_per_s']} tok/s, {r['wall_s']} s")

    m = ctx.measure()
    png = _plot(ctx.folder / "agents.png", runs, f"agents: {p['agents']} agents of {model['name']}, "
                f"tool waits of {p['tool_ms']:g} ms on average")
    body, crit = summarize(ctx, p, math, policies, runs, m)
    if png:
        body["figure"] = png
    return body, crit


def _plot(path, runs: dict, title: str) -> str | None:
    """The wake-up latency CDF of each policy: the whole distribution the P99 criterion reads one point of."""
    from matplotlib.ticker import LogFormatter

    wakes = {x: sorted(ms for rec in r["records"] for ms in rec["wakeups_ms"]) for x, r in runs.items()}
    if not any(wakes.values()):
        return None
    with figure(path, title=title, size=(7, 4.2)) as (ax,):
        for x, ms in wakes.items():
            if ms:
                ys = [(i + 1) / len(ms) for i in range(len(ms))]
                ax.step(ms, ys, where="post", label=f"{x}: {len(ms)} wake-ups, p50 {percentile(ms, 50):.1f} ms, "
                        f"p99 {percentile(ms, 99):.1f} ms")
        ax.axhline(0.99, color="gray", linestyle=":", linewidth=1, label="p99 level")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(LogFormatter())  # 20, 50, 100 rather than 2x10^1
        ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.set_xlabel("wake-up latency: end of the tool wait to the first token (ms)")
        ax.set_ylabel("fraction of wake-ups")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    return str(path)


def summarize(ctx, p: dict, math: dict, policies: list[str], runs: dict, m: dict):
    n, budget = p["agents"], math["budget_bytes"]
    fit = math["sessions_that_fit"]
    vs = m["vram_stats"]
    peak = vs["max_bytes"]
    crit = []

    def add(cid, measured, ok):
        crit.append({"id": cid, "text": ctx.scenario.criteria[cid]["text"], "measured": measured, "ok": ok})

    swapping = [x for x in ("semantic", "reactive") if x in runs]
    if swapping:
        parts = [f"{x} {runs[x]['completed']}/{n}" + (f" ({runs[x]['errors'][0]})" if runs[x]["errors"] else "")
                 for x in swapping]
        add("all_complete", "; ".join(parts), all(runs[x]["completed"] == n for x in swapping))
    else:
        add("all_complete", "only hold ran (it is informational)", None)
    add("peak_under_budget", f"peak {_fmt(peak)} vs budget {format_size(budget)} ({vs['max_source']})",
        peak is not None and peak <= budget)
    if swapping:
        parts, ok = [], True
        for x in swapping:
            r = runs[x]
            needed = r["peak_live_agents"] > fit
            parts.append(f"{x}: {r['peak_live_agents']} live at most, {fit} fit, {r['swap_outs']} swap-outs")
            ok = ok and (r["swap_outs"] > 0 or not needed)
        add("swapping_when_needed", "; ".join(parts), ok)
    else:
        add("swapping_when_needed", "only hold ran", None)

    checked, mismatches = _integrity(runs)
    add("tokens_match", f"{mismatches} of {checked} agents differ between policies" if checked
        else "needs two policies that complete an agent", (mismatches == 0) if checked else None)

    sem, rea = runs.get("semantic"), runs.get("reactive")
    if sem:
        pf = sem["prefetch"]
        add("prefetch_hits", f"{pf['hits']} hits, {pf['misses']} misses ({pf['scheduled']} scheduled, "
            f"{pf['done']} swapped in)", pf["hits"] > 0)
    else:
        add("prefetch_hits", "semantic did not run", None)
    if sem and rea:
        s99, r99 = sem["wakeup_ms"]["p99"], rea["wakeup_ms"]["p99"]
        add("wakeup_p99", f"semantic p99 {s99} ms (p50 {sem['wakeup_ms']['p50']}) vs reactive p99 {r99} ms "
            f"(p50 {rea['wakeup_ms']['p50']}); wake-ups that swapped in {sem['wakeups_that_swapped_in']} vs "
            f"{rea['wakeups_that_swapped_in']}", s99 is not None and r99 is not None and s99 < r99)
    else:
        add("wakeup_p99", "needs both semantic and reactive (policy=all)", None)
    if "hold" in runs:
        h = runs["hold"]
        add("hold_capacity", f"{h['peak_live_agents']} agents live at once at most (the math: {fit}); "
            f"{h['rejected']} of {n} not admitted, {h['completed']} completed", None)

    figures = {x: {k: v for k, v in r.items() if k != "records"} for x, r in runs.items()}
    headline = {}
    for x in ("semantic", "reactive"):
        if x in runs:
            headline[f"{x}_p99_ms"] = runs[x]["wakeup_ms"]["p99"]
    if sem:
        headline["prefetch_hits"] = sem["prefetch"]["hits"]
    if "hold" in runs:
        headline["hold_fit"] = runs["hold"]["peak_live_agents"]
    vs["max_bytes"] = peak
    body = {"params": {**p, "budget": budget, "budget_rule": p["budget"]}, "capacity_math": math,
            "policies": figures,
            "num_sessions_requested": n * len(policies),
            "num_sessions_spawned": sum(r["admitted"] for r in runs.values()),
            "num_sessions_completed": sum(r["completed"] for r in runs.values()),
            "integrity": {"checked_sessions": checked, "mismatches": mismatches},
            "agents": {x: [{k: v for k, v in rec.items() if k != "tokens"} for rec in r["records"]]
                       for x, r in runs.items()},
            "reference": {"arrival_rate": REFERENCE_RATE, "time_scale": round(p["arrival_rate"] / REFERENCE_RATE, 3)},
            "headline": headline, **m, "vram_stats": vs}
    return body, crit


def _integrity(runs: dict) -> tuple[int, int]:
    """Agents completed under two or more policies, and how many of them got different tokens."""
    by_agent: dict[int, list] = {}
    for r in runs.values():
        for rec in r["records"]:
            if rec["status"] == "completed":
                by_agent.setdefault(rec["agent"], []).append(rec["tokens"])
    checked = [toks for toks in by_agent.values() if len(toks) > 1]
    return len(checked), sum(any(t != toks[0] for t in toks[1:]) for toks in checked)


def _fmt(n) -> str:
    return "unknown" if n is None else format_size(n)
