"""exp3: white-box debugging under memory pressure (see exp3.toml).

N sessions pause at layer breakpoints inside their forward pass and stay paused while more
spawn, so demand exceeds the budget and the daemon must swap paused sessions out; then all of
them resume and their tokens are compared with the same prompts run unpaused.
The figure (exp3.png) shows the plateau: device memory over the run against the budget, with the
swaps that hold it there.
"""

import time

from djinnd import DjinnError, format_size, utc_stamp

from .common import prompt_ids, vocab_of
from .exp3_plan import crit, effective, fmt, plan
from .figures import figure


def needs_daemon(p: dict) -> bool:
    return p["baseline"] == "none"


def run_to_last_breakpoint(c, sid: int, layers: list[int]) -> list[dict]:
    """Run the session's prompt to each breakpoint in turn, inspecting the hidden state at every pause."""
    c.run_to(sid, layers=layers)
    pauses = []
    while True:
        s = c.inspect(sid)
        pauses.append({k: s[k] for k in ("layer", "mean", "std", "norm")})
        if s["layer"] == layers[-1]:
            return pauses
        c.resume(sid)


def finish(c, sid: int, gen_tokens: int) -> list[int]:
    """Resume a paused session to the end of its forward, then generate more: every token it produced."""
    token = c.resume(sid)
    while token is None:  # a further breakpoint
        token = c.resume(sid)
    return [token] + (c.generate(sid, gen_tokens) if gen_tokens else [])


def run(ctx, p: dict):
    if p["baseline"] == "hold-all":
        from .baseline import hold_all
        t0_ns = time.monotonic_ns()
        body, criteria = hold_all(ctx, p)
        samples = [e for e in ctx.log.of_type("vram", since_ns=t0_ns) if e.get("origin") == "scenario"]
        t0_ns = samples[0]["mono_ns"] if samples else t0_ns  # the model loads first: time from its first session
        body["figure"] = _plot(ctx.folder / "exp3.png", samples, [], t0_ns, body["capacity_math"]["budget_bytes"],
                               f"exp3 baseline (hold-all, not djinn): {body['model']['name']}")
        return body, criteria
    c = ctx.client
    st = ctx.daemon_status(p["model"])
    model = st["model"]
    layers, math = plan(ctx, p, model, st["memory"]["budget_bytes"])
    ctx.set_budget(math["budget_bytes"])
    if not p["swap"]:
        ctx.set_swap(False)
    t0_ns = time.monotonic_ns()
    ctx.begin()
    n, vocab = p["sessions"], vocab_of(model)
    total = 2 * n
    swap0 = ctx.status()["swap"]["swap_outs"]
    reasons, paused, progression, records = [], [], [], []
    first_swap_at, charged = None, None

    # spawn: each session runs to its breakpoints, inspected at each, and stays paused at the last
    for i in range(1, n + 1):
        ids = prompt_ids(p["seed"], i, p["prompt_len"], vocab)
        rec = {"session": i, "pauses": []}
        try:
            sid = rec["id"] = ctx.create_session(token_ids=ids)
            rec["pauses"] = run_to_last_breakpoint(c, sid, layers)
        except DjinnError as e:
            reasons.append(f"session {i} of {n} could not run: {e.code}: {e}")
            ctx.say(f"session {i}: {e.code}: {e}")
            records.append(rec)
            break
        paused.append((i, sid, ids))
        records.append(rec)
        st = ctx.status()
        if charged is None:
            charged = c.session(sid)["device_bytes"]
        outs = st["swap"]["swap_outs"] - swap0
        if outs and first_swap_at is None:
            first_swap_at = i
        progression.append({"session": i, "used_bytes": st["memory"]["device_bytes"], "timestamp": utc_stamp(),
                            "host_bytes": st["memory"]["host_bytes"], "swap_outs": outs})
        ctx.progress(i, total, f"session {i} paused at layer {layers[-1]}; "
                     f"{format_size(st['memory']['device_bytes'])} used, {outs} swap-outs")

    if charged is not None and charged != math["bytes_per_session"]:
        ctx.note(f"the capacity math says {math['bytes_per_session']} B per paused session; "
                 f"the daemon charged {charged} B")

    # resume every session to the end, generate more, and check against the same prompt unpaused
    completed, mismatches, checked = 0, 0, 0
    for k, (i, sid, ids) in enumerate(paused, 1):
        rec = records[i - 1]
        try:
            tokens = finish(c, sid, p["gen_tokens"])
            rec["swaps"] = c.session(sid)["swaps"]
            ctx.close_session(sid)
            completed += 1
            ref = ctx.create_session(token_ids=ids)
            expected = c.generate(ref, 1 + p["gen_tokens"])
            ctx.close_session(ref)
        except DjinnError as e:
            reasons.append(f"session {i} did not complete: {e.code}: {e}")
            continue
        checked += 1
        rec["tokens"], rec["match"] = tokens, tokens == expected
        if tokens != expected:
            mismatches += 1
            rec["expected"] = expected
        ctx.progress(n + k, total, f"session {i} completed, {'tokens match' if rec['match'] else 'MISMATCH'}")

    m = ctx.measure()  # after it the recorder holds every sample and swap of the run
    samples = [e for e in ctx.log.of_type("vram", since_ns=t0_ns) if e.get("origin") != "scenario"]
    swaps = ctx.log.of_type("swap_out", "swap_in", since_ns=t0_ns)
    png = _plot(ctx.folder / "exp3.png", samples, swaps, t0_ns, math["budget_bytes"],
                f"exp3: {n} paused sessions of {model['name']} under a {format_size(math['budget_bytes'])} budget")
    vs, budget = m["vram_stats"], math["budget_bytes"]
    tops = [x for x in (vs["max_bytes"], max((e["used_bytes"] for e in progression), default=None)) if x is not None]
    peak = max(tops) if tops else None
    vs["max_bytes"] = peak
    device = device_figures(samples, vs, ctx.log.of_type("error", since_ns=t0_ns))
    if device is None:  # the CPU: the books are the figure (nothing else reports what sessions hold)
        plateau = crit(ctx, "peak_under_budget", f"peak {fmt(peak)} vs budget {format_size(budget)} ({vs['max_source']})",
                       peak is not None and peak <= budget)
    else:  # CUDA: what the device reports decides, the books beside
        vs["device"] = device
        vs["plateau_source"] = "device"
        dpeak = device["peak_bytes"]
        plateau = crit(ctx, "peak_under_budget",
                       f"device peak {fmt(dpeak)} vs budget {format_size(budget)} (the allocator's allocated bytes: "
                       f"its peak counter and {device['samples']} samples); the books' peak {fmt(peak)}; "
                       f"reserved peak {fmt(device['peak_reserved_bytes'])}, NVML used peak {fmt(device['peak_nvml_used_bytes'])}",
                       dpeak is not None and dpeak <= budget and peak is not None and peak <= budget)
    criteria = [
        crit(ctx, "all_complete", f"{completed} of {n} completed" + (f"; {reasons[0]}" if reasons else ""),
              completed == n),
        plateau,
        crit(ctx, "swapping_when_needed",
              f"{m['swap']['swap_outs']} swap-outs, {m['swap']['swap_ins']} swap-ins; the math "
              + ("says it must swap from session " + str(math["swap_from_session"]) if math["expected_swapping"]
                 else "says all fit"),
              m["swapping_active"] or not math["expected_swapping"]),
        crit(ctx, "integrity", f"{mismatches} mismatches in {checked} sessions checked",
              mismatches == 0 and checked == completed and checked > 0),
    ]
    if device is not None:
        criteria.append(crit(ctx, "books_match_device",
                             f"drift (allocated - load baseline - books) from {fmt_signed(device['min_drift_bytes'])} "
                             f"to {fmt_signed(device['max_drift_bytes'])} over {device['samples']} samples, limit "
                             f"{fmt(device['drift_limit_bytes'])}; {device['drift_errors']} ledger_drift errors",
                             device["max_drift_bytes"] <= device["drift_limit_bytes"] and not device["drift_errors"]))
    body = {"params": effective(p, layers, math), "capacity_math": math, "breakpoints": layers,
            "num_sessions_requested": n,
            "num_sessions_spawned": len(paused), "num_sessions_completed": completed,
            "vram_progression": progression, "first_swap_at_session": first_swap_at,
            "bytes_per_session_charged": charged, "integrity": {"checked_sessions": checked, "mismatches": mismatches},
            "errors": reasons, "sessions": records,
            "headline": {"first_swap_at": first_swap_at}, "figure": png, **m, "vram_stats": vs}
    return body, criteria


def device_figures(samples: list[dict], vs: dict, errors: list[dict]) -> dict | None:
    """On CUDA (the daemon's samples carry the allocator's figures): the device's peak (the largest of
    its samples' allocated bytes and the allocator's own peak counter over the run), the reserved and
    NVML peaks beside it, and the drift of the allocator against the books. None on the CPU."""
    dev = [e for e in samples if e.get("allocated_bytes") is not None]
    if not dev:
        return None
    counter = vs.get("allocator_peak_bytes")
    drifts = [e["drift_bytes"] for e in dev if e.get("drift_bytes") is not None]
    nvml = [e["nvml_used_bytes"] for e in dev if e.get("nvml_used_bytes") is not None]
    limits = [e["drift_limit_bytes"] for e in dev if e.get("drift_limit_bytes") is not None]
    return {"samples": len(dev),
            "peak_bytes": max([e["allocated_bytes"] for e in dev] + ([counter] if counter is not None else [])),
            "peak_sampled_bytes": max(e["allocated_bytes"] for e in dev), "allocator_peak_counter_bytes": counter,
            "peak_ledger_bytes": max((e.get("ledger_bytes") or e["used_bytes"]) for e in dev),
            "peak_reserved_bytes": max(e.get("reserved_bytes") or 0 for e in dev),
            "peak_nvml_used_bytes": max(nvml) if nvml else None,
            "baseline_bytes": (dev[0].get("allocated_bytes") or 0) - (dev[0].get("device_used_bytes") or dev[0]["allocated_bytes"]),
            "max_drift_bytes": max(drifts) if drifts else None, "min_drift_bytes": min(drifts) if drifts else None,
            "drift_limit_bytes": min(limits) if limits else None,
            "drift_errors": sum(1 for e in errors if e.get("where") == "ledger_drift")}


def fmt_signed(n) -> str:
    return "unknown" if n is None else ("-" if n < 0 else "+") + format_size(abs(n))


def _plot(path, samples: list[dict], swaps: list[dict], t0_ns: int, budget: int, title: str) -> str | None:
    """Device memory over the run (the daemon's samples) against the budget, and when each session
    was swapped out and back in: the plateau is the swaps holding memory under the budget."""
    if not samples:
        return None
    mib = 1 << 20

    def sec(e):
        return (e["mono_ns"] - t0_ns) / 1e9

    with figure(path, 2 if swaps else 1, 1, title=title, size=(8, 6 if swaps else 4)) as axes:
        mem = axes[0]
        xs = [sec(e) for e in samples]
        device = all(e.get("allocated_bytes") is not None for e in samples)  # CUDA: the device's figure leads
        if device:
            mem.plot(xs, [e["allocated_bytes"] / mib for e in samples], "-", label="device memory (CUDA allocator)")
            mem.plot(xs, [e["used_bytes"] / mib for e in samples], ":", color="tab:gray", label="the daemon's books")
        else:
            mem.plot(xs, [e["used_bytes"] / mib for e in samples], "-", label="device memory used")
        if any(e.get("host_bytes") for e in samples):
            mem.plot(xs, [(e.get("host_bytes") or 0) / mib for e in samples], "--", label="swapped out to host")
        mem.axhline(budget / mib, color="red", linestyle=":", label=f"budget ({format_size(budget)})")
        top = max(max(e["used_bytes"], e.get("allocated_bytes") or 0) for e in samples)
        mem.set_ylim(0, max(budget, top) / mib * 1.2)  # room for the legend
        mem.set_ylabel("MiB")
        mem.set_title("device memory")
        if swaps:
            ev = axes[1]
            for kind, marker, color, label in (("swap_out", "v", "tab:red", "swap-out"),
                                               ("swap_in", "^", "tab:green", "swap-in")):
                es = [e for e in swaps if e["type"] == kind]
                ev.plot([sec(e) for e in es], [e["session"] for e in es], marker, color=color, linestyle="",
                        label=f"{label} ({len(es)})")
            ev.set_ylabel("session id (daemon)")
            ev.set_title("swaps: sessions moved out of device memory and back in")
            ev.sharex(mem)
        for ax in axes:
            ax.set_xlabel("seconds since the first session")
            ax.grid(True, alpha=0.3)
            ax.legend(loc="best", fontsize="small")
    return str(path)
