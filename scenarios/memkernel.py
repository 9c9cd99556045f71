"""memkernel: the memory kernel under a long session churn, against plain PyTorch (memkernel.toml).

The churn is drawn from the seed alone (`churn`), so the daemon and the baseline see the same
operations: create (prefill a prompt, generate a few tokens), grow (generate more: the KV slab grows)
and close. The budget holds only part of what the live sessions need; the daemon swaps the idle ones
out to its host pool and back in when they grow again.

The baseline runs beside it in this process, operation for operation: a plain tensor per live session
of the bytes the daemon charged it (read back after each operation), replaced by a bigger one when
the session grows (both held for a moment, as torch.cat does) and dropped when it closes. It never
loads the model: the daemon's weights bytes are counted for it, once, as for the daemon.

Fragmentation. The host pool is carved first-fit from offset 0; `status.memory.host_span_bytes` is
where its highest range in use ends (its footprint), and 1 - host_bytes / host_span_bytes the share
of that footprint lying in holes: the counterpart of the CUDA caching allocator's
1 - allocated / reserved. The criterion takes its mean over the churn's second half: one sample can
be high in a healthy pool (a last range left near the top), the mean cannot stay high. A pool that did
not coalesce freed neighbours would leave holes too small for the next (grown) swap-out, whose ranges
then go past them: its footprint runs away from what it holds. Beside it, `of_peaks`:
1 - (most bytes the pool held at once) / (its largest footprint), the allocators' peak-based figure.
"""

import functools
import random
import statistics
import time

from djinnd import DjinnError, estimate, format_size, utc_stamp

from .common import Skip, prompt_ids, vocab_of
from .exp3_plan import crit, fmt
from .figures import figure

P_CREATE, P_GROW = 0.35, 0.45  # the churn's mix (the rest: close); at max_live, grow or close only


def needs_daemon(p: dict) -> bool:
    return True


# -- the churn, from the seed alone -------------------------------------------------------------------
def churn(p: dict, context: int):
    """The operations, in order: ("create", index, prompt_len, tokens), ("grow", index, tokens),
    ("close", index). A generator: a long run's millions of operations are never held at once."""
    rng = random.Random(f"memkernel-{p['seed']}")
    cap = min(p["max_tokens"], context)
    live: dict[int, int] = {}  # index -> tokens it holds (prompt + generated)
    n = 0
    for _ in range(p["ops"]):
        full = len(live) >= p["max_live"]
        r = rng.uniform(P_CREATE if full else 0.0, 1.0)
        if not live or r < P_CREATE:
            n += 1
            plen = rng.randint(p["prompt_min"], min(p["prompt_max"], cap - 1))
            g = min(rng.randint(p["grow_min"], p["grow_max"]), cap - plen)
            live[n] = plen + g
            yield ("create", n, plen, g)
            continue
        idx = rng.choice(list(live))
        room = cap - live[idx]
        if r < P_CREATE + P_GROW and room >= 1:
            g = min(rng.randint(p["grow_min"], p["grow_max"]), room)
            live[idx] += g
            yield ("grow", idx, g)
        else:  # a close, or a grow of a session at its length cap (it is done)
            del live[idx]
            yield ("close", idx)


def planned(p: dict, model: dict, context: int) -> dict:
    """The capacity math of the churn, by the daemon's published charge rules (`estimate`): the live
    KV demand at its peak, and the largest single session."""
    kv = functools.lru_cache(maxsize=None)(lambda plen, g: estimate(model, plen, g)["kv_bytes"])
    live: dict[int, tuple[int, int]] = {}  # index -> (prompt_len, generated)
    demand = peak = peak_live = biggest = created = 0
    for op in churn(p, context):
        kind, idx = op[0], op[1]
        if kind == "close":
            plen, g = live.pop(idx)
            demand -= kv(plen, g)
            continue
        if kind == "create":
            created += 1
            plen, g = op[2], op[3]
        else:
            plen, g = live[idx]
            demand -= kv(plen, g)
            g += op[2]
        live[idx] = (plen, g)
        demand += kv(plen, g)
        biggest = max(biggest, kv(plen, g))
        if demand > peak:
            peak, peak_live = demand, len(live)
    return {"peak_kv_bytes": peak, "live_at_peak": peak_live, "largest_session_kv_bytes": biggest,
            "sessions": created}


def resolve_budget(ctx, p: dict, model: dict, mem: dict, plan: dict) -> int:
    weights = mem["weights_bytes"] + mem.get("overhead_bytes", 0)
    act = estimate(model, p["prompt_max"])["activation_bytes"]  # as the daemon charges a paused prefill
    least = weights + plan["largest_session_kv_bytes"] + act  # one session's prefill alone must fit
    if p["budget"] == "daemon":
        budget = mem["budget_bytes"]
    elif p["budget"] == "auto":
        budget = weights + int(p["budget_fraction"] * plan["peak_kv_bytes"])
        if budget < least:
            ctx.note(f"budget auto ({format_size(budget)}) would not hold the largest session's prefill: "
                     f"raised to {format_size(least)}")
            budget = least
    else:
        budget = p["budget"]
    if budget < least:
        raise Skip(f"budget {format_size(budget)} is too small for the churn's largest session: weights "
                   f"{format_size(weights)} + KV {format_size(plan['largest_session_kv_bytes'])} + its prefill's "
                   f"activations {format_size(act)} = {format_size(least)}")
    return budget


# -- the baseline: plain tensors held and freed ---------------------------------------------------------
class Holder:
    """What plain PyTorch holds for the same sessions (not djinn): a tensor each, replaced when it grows."""

    def __init__(self, kind: str, index, weights: int):
        import torch
        self.torch = torch
        self.cuda = kind == "cuda"
        self.device = torch.device("cuda", index or 0) if self.cuda else torch.device("cpu")
        self.weights = weights
        self.held: dict[int, object] = {}
        self.live = 0  # bytes of the tensors held
        self.peak_live = 0
        self.oom_at: int | None = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.a0 = torch.cuda.memory_allocated(self.device)
            self.r0 = torch.cuda.memory_reserved(self.device)

    def hold(self, idx: int, nbytes: int, op: int) -> None:
        """Session `idx` now needs `nbytes`: a first tensor, or a bigger one with the old copied in."""
        if self.oom_at is not None:
            return
        old = self.held.get(idx)
        if old is not None and old.numel() == nbytes:
            return
        try:
            new = self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.device)
        except self.torch.cuda.OutOfMemoryError:
            self.oom_at = op
            self.held.clear()
            self.live = 0
            return
        self.live += nbytes
        self.peak_live = max(self.peak_live, self.live)  # old and new at once, as torch.cat holds them
        if old is not None:
            k = min(old.numel(), nbytes)
            new[:k].copy_(old[:k])
            self.live -= old.numel()
        self.held[idx] = new
        del old

    def drop(self, idx: int) -> None:
        t = self.held.pop(idx, None)
        if t is not None:
            self.live -= t.numel()

    def figures(self) -> dict:
        """Now: its device bytes (the weights once, and what it holds) and, on CUDA, the allocator's reserve."""
        if not self.cuda:
            return {"baseline_bytes": self.weights + self.live}
        c = self.torch.cuda
        alloc, res = c.memory_allocated(self.device) - self.a0, c.memory_reserved(self.device) - self.r0
        return {"baseline_bytes": self.weights + alloc, "baseline_reserved_bytes": self.weights + res,
                "baseline_fragmentation": round(1 - alloc / res, 4) if res > 0 else None}

    def peaks(self) -> dict:
        if not self.cuda:
            return {"peak_bytes": self.weights + self.peak_live, "reserved_peak_bytes": None}
        c = self.torch.cuda
        return {"peak_bytes": self.weights + c.max_memory_allocated(self.device) - self.a0,
                "reserved_peak_bytes": self.weights + c.max_memory_reserved(self.device) - self.r0}

    def close(self) -> None:
        self.held.clear()
        self.live = 0
        if self.cuda:
            self.torch.cuda.empty_cache()


# -- the run ------------------------------------------------------------------------------------------
def run(ctx, p: dict):
    c = ctx.client
    st = ctx.daemon_status(p["model"])
    model, mem0, kind = st["model"], st["memory"], st["device"]["kind"]
    context = int(model.get("context_length") or p["max_tokens"])
    if p["prompt_min"] > p["prompt_max"] or p["grow_min"] > p["grow_max"]:
        raise Skip(f"bad ranges: prompts {p['prompt_min']}..{p['prompt_max']}, growth {p['grow_min']}..{p['grow_max']}")
    if p["prompt_min"] >= min(p["max_tokens"], context):
        raise Skip(f"prompt_min {p['prompt_min']} leaves no room to generate under the length cap "
                   f"{min(p['max_tokens'], context)} (max_tokens, and the model's context)")
    has_span = "host_span_bytes" in mem0
    if not has_span:
        ctx.note("this daemon's status has no host_span_bytes: the host pool's fragmentation is not measured")

    t_plan = time.perf_counter()
    plan = planned(p, model, context)
    budget = resolve_budget(ctx, p, model, mem0, plan)
    weights = mem0["weights_bytes"]
    demand = weights + plan["peak_kv_bytes"]
    math = {"weights_bytes": weights, "kv_bytes_per_session": plan["peak_kv_bytes"] // max(1, plan["live_at_peak"]),
            "sessions": plan["live_at_peak"], "demand_bytes": demand, "budget_bytes": budget,
            "expected_swapping": demand > budget, "demand_over_budget": round(demand / budget, 3),
            "largest_session_kv_bytes": plan["largest_session_kv_bytes"], "sessions_created": plan["sessions"],
            "rule": "peak live KV demand of the churn by the daemon's charge rules (djinnd.estimate); "
                    "kv_bytes_per_session is its mean per live session at that peak",
            "planned_in_s": round(time.perf_counter() - t_plan, 3)}
    if p["budget"] != "daemon":
        ctx.set_budget(budget)
    ctx.budget = budget
    ctx.say(f"memkernel: {model['name']} on {kind}, {p['ops']} operations (seed {p['seed']}), at most "
            f"{p['max_live']} sessions live, prompts {p['prompt_min']}..{p['prompt_max']} tokens, growth "
            f"{p['grow_min']}..{p['grow_max']}, length cap {min(p['max_tokens'], context)}")
    ctx.say(f"  capacity math: weights {format_size(weights)} + peak live KV {format_size(plan['peak_kv_bytes'])} "
            f"({plan['live_at_peak']} sessions) = {format_size(demand)} vs budget {format_size(budget)} "
            f"({math['demand_over_budget']:.2f}x)")

    holder = Holder(kind, st["device"].get("index"), weights)
    if not holder.cuda:
        ctx.say("  baseline on the CPU: there is no allocator reserve to read (the CPU allocator gives memory back "
                "to the OS), so its figure is the bytes of the tensors it holds, beside the weights")
    vocab = vocab_of(model)
    sids: dict[int, int] = {}  # churn index -> daemon session id
    meta: dict[int, list] = {}  # index -> [prompt_len, tokens] for the checked sessions
    charged: dict[int, int] = {}  # index -> bytes the daemon charged it after its last operation
    checked: list[dict] = []
    errors: list[str] = []
    failed: set[int] = set()  # sessions an operation failed on
    off_rule = []  # operations where the daemon charged other than the rules say
    kv = functools.lru_cache(maxsize=None)(lambda plen, g: estimate(model, plen, g)["kv_bytes"])
    lengths: dict[int, tuple[int, int]] = {}
    samples: list[dict] = []
    counts = {"create": 0, "grow": 0, "close": 0}
    created = spawn_failed = 0
    every = p["sample_every"]
    report = max(1, p["ops"] // 20)

    def sample(op: int) -> None:
        s = ctx.status()
        m, sw = s["memory"], s["swap"]
        span = m.get("host_span_bytes")
        row = {"op": op, "t_s": round(time.perf_counter() - t0, 3), "timestamp": utc_stamp(), "live": len(sids),
               "created": created, "device_bytes": m["device_bytes"], "peak_device_bytes": m["peak_device_bytes"],
               "budget_bytes": m["budget_bytes"], "host_bytes": m["host_bytes"], "host_span_bytes": span,
               "host_fragmentation": round(1 - m["host_bytes"] / span, 4) if span else None,
               "disk_bytes": m["disk_bytes"], "swap_outs": sw["swap_outs"] - swap0["swap_outs"],
               "swap_ins": sw["swap_ins"] - swap0["swap_ins"],
               "demand_bytes": weights + sum(charged[i] for i in sids if i in charged), **holder.figures()}
        for k in ("allocated_bytes", "reserved_bytes"):
            if k in m:
                row[k] = m[k]
        samples.append(row)

    def after(idx: int, sid: int, op: int) -> None:
        """Read back what the daemon charged the session; the baseline holds as much."""
        info = c.session(sid)
        nbytes = info["device_bytes"] if info["location"] == "device" else info["host_bytes"] + info["disk_bytes"]
        charged[idx] = nbytes
        plen, g = lengths[idx]
        if info["location"] == "device" and nbytes != kv(plen, g) and len(off_rule) < 20:
            off_rule.append({"op": op, "charged": nbytes, "rule": kv(plen, g)})
        holder.hold(idx, nbytes, op)

    ctx.begin()
    swap0 = ctx.status()["swap"]
    t0 = time.perf_counter()
    sample(0)
    op = 0
    for op, step in enumerate(churn(p, context), 1):
        kind_, idx = step[0], step[1]
        counts[kind_] += 1
        try:
            if kind_ == "create":
                plen, g = step[2], step[3]
                created += 1
                sid = sids[idx] = ctx.create_session(token_ids=prompt_ids(p["seed"], idx, plen, vocab))
                lengths[idx] = (plen, g)
                toks = c.generate(sid, g)
                if idx % p["check_every"] == 0:
                    meta[idx] = [plen, toks]
                after(idx, sid, op)
            elif idx not in sids:
                pass  # its create failed: already reported
            elif kind_ == "grow":
                sid = sids[idx]
                plen, g = lengths[idx]
                lengths[idx] = (plen, g + step[2])
                toks = c.generate(sid, step[2])
                if idx in meta:
                    meta[idx][1] += toks
                after(idx, sid, op)
            else:
                close(ctx, idx, sids, meta, checked, charged, lengths, holder)
        except DjinnError as e:
            errors.append(f"operation {op} ({kind_} of session {idx}): {e.code}: {e}")
            failed.add(idx)
            spawn_failed += kind_ == "create" and idx not in sids
            if kind_ == "create" and idx in sids:
                close(ctx, idx, sids, {}, checked, charged, lengths, holder)
            meta.pop(idx, None)
        if op % every == 0:
            sample(op)
        if op % report == 0:
            last = samples[-1]
            ctx.progress(op, p["ops"], f"{len(sids)} live; device {format_size(last['device_bytes'])} of "
                         f"{format_size(budget)}; host pool {format_size(last['host_bytes'])}; baseline "
                         f"{format_size(last['baseline_bytes'])}")
    churn_s = time.perf_counter() - t0
    for idx in sorted(sids):  # the churn is over: close what lives
        try:
            close(ctx, idx, sids, meta, checked, charged, lengths, holder)
        except DjinnError as e:
            errors.append(f"closing session {idx} after the churn: {e.code}: {e}")
            failed.add(idx)
    sample(op)
    peaks = holder.peaks()
    oom_at = holder.oom_at
    holder.close()
    m = ctx.measure()

    # the checked sessions' tokens, against the same prompt run alone (no other session lives now)
    mismatches, swapped_checked = 0, 0
    for k, rec in enumerate(checked, 1):
        try:
            ref = ctx.create_session(token_ids=prompt_ids(p["seed"], rec["session"], rec["prompt_len"], vocab))
            expected = c.generate(ref, len(rec["tokens"]))
            ctx.close_session(ref)
        except DjinnError as e:
            errors.append(f"reference for session {rec['session']}: {e.code}: {e}")
            rec["match"] = None
            continue
        rec["match"] = expected == rec["tokens"]
        swapped_checked += rec["swaps"] > 0
        if not rec["match"]:
            mismatches += 1
            rec["expected"] = expected
        if k % max(1, len(checked) // 10) == 0:
            ctx.progress(p["ops"], p["ops"], f"checked {k} of {len(checked)} sessions' tokens")
    compared = [r for r in checked if r["match"] is not None]

    return finish(ctx, p, model, kind, math, budget, samples, peaks, oom_at, m, errors, counts,
                  (created, created - spawn_failed, created - len(failed)), compared, mismatches, swapped_checked,
                  off_rule, churn_s, has_span)


def close(ctx, idx, sids, meta, checked, charged, lengths, holder) -> None:
    sid = sids.pop(idx)
    rec = meta.pop(idx, None)
    if rec is not None:
        swaps = ctx.client.session(sid)["swaps"]
        checked.append({"session": idx, "prompt_len": rec[0], "tokens": rec[1], "swaps": swaps})
    charged.pop(idx, None)
    lengths.pop(idx, None)
    holder.drop(idx)
    ctx.sessions.discard(sid)
    ctx.client.close(sid)


def finish(ctx, p, model, kind, math, budget, samples, peaks, oom_at, m, errors, counts, sessions, compared,
           mismatches, swapped_checked, off_rule, churn_s, has_span):
    vs = m["vram_stats"]
    created, spawned, completed = sessions
    daemon_peak = max([x for x in [vs["peak_device_bytes"], *(s["device_bytes"] for s in samples)] if x is not None])
    vs["max_bytes"] = daemon_peak
    alloc_peak = vs["allocator_peak_bytes"]  # CUDA: the allocator's own
    base_peak = peaks["peak_bytes"]
    host_peak = max(s["host_bytes"] for s in samples)
    span_peak = max((s["host_span_bytes"] or 0) for s in samples)
    disk_peak = max(s["disk_bytes"] for s in samples)
    frag = round(1 - host_peak / span_peak, 4) if span_peak else None
    half = [s["host_fragmentation"] for s in samples[len(samples) // 2:] if s["host_fragmentation"] is not None]
    frag_mean = round(statistics.fmean(half), 4) if half else None
    frag_max = max(half) if half else None
    frag_final = next((s["host_fragmentation"] for s in reversed(samples) if s["host_fragmentation"] is not None), None)
    ops_done = counts["create"] + counts["grow"] + counts["close"]
    if off_rule:
        ctx.note(f"the daemon charged other than its rules say after {len(off_rule)} operations "
                 f"(first: op {off_rule[0]['op']}, {off_rule[0]['charged']} B vs {off_rule[0]['rule']} B)")

    cuda_base = ""
    if peaks["reserved_peak_bytes"] is not None:
        cuda_base = f" (the caching allocator reserved {fmt(peaks['reserved_peak_bytes'])} at its peak)"
    if frag_mean is None:
        frag_c = crit(ctx, "fragmentation_bounded", "not measured: " + (
            "the daemon does not report host_span_bytes" if not has_span else
            "nothing was in the host pool over the second half of the churn"), None)
    else:
        frag_c = crit(ctx, "fragmentation_bounded",
                      f"1 - used / footprint averaged {frag_mean:.3f} over the second half ({len(half)} samples) "
                      f"{'<=' if frag_mean <= p['max_fragmentation'] else '>'} {p['max_fragmentation']} "
                      f"(at most {_f(frag_max)}; peaks: {fmt(host_peak)} held, {fmt(span_peak)} footprint)",
                      frag_mean <= p["max_fragmentation"])
    criteria = [
        crit(ctx, "all_complete", f"{ops_done - len(errors)} of {ops_done} operations completed"
             + (f"; {errors[0]}" if errors else ""), not errors),
        crit(ctx, "tokens_equal", f"{mismatches} of {len(compared)} checked sessions differ from the prompt run alone "
             f"({swapped_checked} of them had been swapped out and back in)", mismatches == 0 and bool(compared)),
        crit(ctx, "peak_under_budget", f"peak {fmt(daemon_peak)} vs budget {format_size(budget)} ({vs['max_source']})"
             + (f"; the CUDA allocator's peak {fmt(alloc_peak)} (reserved {fmt(vs['allocator_reserved_peak_bytes'])})"
                if alloc_peak is not None else ""),
             daemon_peak <= budget and (alloc_peak is None or alloc_peak <= budget)),
        frag_c,
        crit(ctx, "pressure", (f"the baseline ran out of device memory at operation {oom_at}" if oom_at else
                               f"baseline peak {fmt(base_peak)}{cuda_base} "
                               f"{'>' if base_peak > budget else '<='} budget {format_size(budget)}"
                               + ("" if base_peak > budget else ": the churn never needed more than the budget, "
                                  "so there was nothing to swap for")),
             bool(oom_at) or base_peak > budget),
    ]

    title = (f"memkernel: {ops_done} operations, {created} sessions of {model['name']} on {kind}, "
             f"budget {format_size(budget)}")
    png = plot(ctx.folder / "memkernel.png", samples, budget, p["max_fragmentation"], frag_mean, kind, title)
    headline = {"ops": ops_done, "sessions": created, "budget_bytes": budget, "daemon_peak_bytes": daemon_peak,
                "baseline_peak_bytes": base_peak, "baseline_reserved_peak_bytes": peaks["reserved_peak_bytes"],
                "baseline_over_budget": round(base_peak / budget, 3), "host_peak_bytes": host_peak,
                "host_span_peak_bytes": span_peak, "host_fragmentation": frag_mean,
                "host_fragmentation_max_second_half": frag_max, "host_fragmentation_peaks": frag,
                "host_fragmentation_final": frag_final,
                "disk_peak_bytes": disk_peak, "swap_outs": m["swap"]["swap_outs"], "swap_ins": m["swap"]["swap_ins"],
                "ops_per_s": round(ops_done / churn_s, 2) if churn_s > 0 else None}
    ctx.say(f"  daemon peak {fmt(daemon_peak)} <= budget {format_size(budget)}; baseline peak {fmt(base_peak)}"
            f"{cuda_base} ({headline['baseline_over_budget']:.2f}x the budget); host pool held at most "
            f"{fmt(host_peak)} in a footprint of {fmt(span_peak)} (fragmentation {_f(frag_mean)} on average over the "
            f"second half), disk {fmt(disk_peak)}; "
            f"{headline['swap_outs']} swap-outs, {headline['swap_ins']} swap-ins, {headline['ops_per_s']} ops/s")
    progression = [{"op": s["op"], "session": s["created"], "used_bytes": s["device_bytes"],
                    "timestamp": s["timestamp"], "host_bytes": s["host_bytes"]} for s in samples]
    baseline = {"kind": "naive-holder",
                "label": "baseline: plain PyTorch tensors in this process, one per live session of the bytes "
                         "the daemon charged it, replaced by a bigger one as it grows (not djinn); the weights "
                         "counted once",
                "measured_by": ("torch.cuda.max_memory_allocated / max_memory_reserved, plus the weights"
                                if kind == "cuda"
                                else "the bytes of the tensors held, plus the weights (the CPU has no allocator "
                                     "reserve to read: its allocator gives memory back to the OS)"),
                **peaks, "oom_at_op": oom_at}
    body = {"headline": headline, "figure": png, "params": {**p, "budget": budget, "budget_rule": p["budget"]},
            "capacity_math": math, "op_counts": counts, "churn_s": round(churn_s, 3),
            "num_sessions_requested": created, "num_sessions_spawned": spawned,
            "num_sessions_completed": completed,
            "vram_progression": progression, "samples": samples, "baseline": baseline,
            "fragmentation": {"definition": "host pool: 1 - host_bytes / host_span_bytes (holes in its footprint); "
                                            "CUDA baseline: 1 - allocated / reserved",
                              "mean_second_half": frag_mean, "max_second_half": frag_max, "final": frag_final,
                              "of_peaks": frag,
                              "of_peaks_definition": "1 - most bytes held at once / largest footprint",
                              "threshold": p["max_fragmentation"]},
            "integrity": {"checked_sessions": len(compared), "mismatches": mismatches,
                          "swapped_checked": swapped_checked},
            "checked": [{k: v for k, v in r.items() if k != "tokens"} | {"num_tokens": len(r["tokens"])}
                        for r in compared[:200]],
            "charge_off_rule": off_rule, "errors": errors[:100], **m, "vram_stats": vs}
    return body, criteria


def plot(path, samples: list[dict], budget: int, threshold: float, frag_mean, kind: str, title: str) -> str | None:
    """Device bytes against the budget (daemon and baseline), the host pool and disk tier, and the
    fragmentation, over the operations."""
    if not samples:
        return None
    mib = 1 << 20
    xs = [s["op"] for s in samples]
    with figure(path, 1, 3, title=title, size=(16, 4.6)) as (dev, host, frag):
        dev.plot(xs, [s["baseline_bytes"] / mib for s in samples], color="tab:gray",
                 label="baseline: plain PyTorch holding them" + (" (allocated)" if kind == "cuda" else ""))
        if kind == "cuda":
            dev.plot(xs, [s["baseline_reserved_bytes"] / mib for s in samples], color="tab:gray", linestyle="--",
                     label="baseline: reserved")
        dev.plot(xs, [s["device_bytes"] / mib for s in samples], color="tab:blue", label="djinnd: device bytes")
        dev.plot(xs, [s["peak_device_bytes"] / mib for s in samples], color="tab:blue", linestyle=":",
                 label="djinnd: peak")
        dev.axhline(budget / mib, color="red", linestyle="--", label=f"budget ({format_size(budget)})")
        dev.set_title("device memory")
        dev.set_ylabel("MiB")
        top = max([budget] + [max(s["baseline_bytes"], s.get("baseline_reserved_bytes") or 0) for s in samples])
        dev.set_ylim(0, top / mib * 1.25)
        host.plot(xs, [s["host_bytes"] / mib for s in samples], color="tab:green", label="host pool: in use")
        host.plot(xs, [(s["host_span_bytes"] or 0) / mib for s in samples], color="tab:olive", linestyle="--",
                  label="host pool: footprint (span)")
        host.plot(xs, [s["disk_bytes"] / mib for s in samples], color="tab:brown", label="disk tier")
        host.set_title("swapped-out state")
        host.set_ylabel("MiB")
        host.set_ylim(bottom=0)
        nan = float("nan")
        frag.plot(xs, [nan if s["host_fragmentation"] is None else s["host_fragmentation"] for s in samples],
                  color="tab:green", label="host pool: 1 - used / footprint")
        if kind == "cuda":
            frag.plot(xs, [nan if s.get("baseline_fragmentation") is None else s["baseline_fragmentation"]
                           for s in samples], color="tab:gray", label="baseline: 1 - allocated / reserved")
        if frag_mean is not None:
            half = samples[len(samples) // 2:]
            frag.plot([half[0]["op"], half[-1]["op"]], [frag_mean, frag_mean], color="darkgreen", linewidth=2.5,
                      label=f"its mean over the second half ({frag_mean:.2f})")
        frag.axhline(threshold, color="red", linestyle="--", label=f"threshold ({threshold})")
        frag.set_title("fragmentation")
        frag.set_ylim(0, 1.05)
        for ax in (dev, host, frag):
            ax.set_xlabel("operation")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small", loc="best", framealpha=0.85)
    return str(path)


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"
