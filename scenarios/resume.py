"""resume: resume latency by depth, from a swap, held on the device, and recomputed (resume.toml).

Every measurement is one fresh session paused at the layer (its prefill is not timed), so the ways
differ only in what happens between the pause and the token. The swap way squeezes the budget to the
weights for a moment: the daemon swaps out everything not computing (the paused session among them),
and its resume swaps it back in on demand. A resume counts as one from a swap when the session was
off the device before it and the daemon's swap-in counter rose during it.
"""

import json
import time

from djinnd import DjinnError

from .common import capacity_math, median, prompt_ids, vocab_of
from .exp3_plan import crit
from .figures import figure

WAYS = ("swap", "held", "recompute")
CHUNK = 16384  # values per inspect reply: ~350 kB of JSON, well under the 1 MiB frame
MAX_COMPARED = 1 << 20  # hidden-state values compared per check; past it, evenly spaced positions


def needs_daemon(p: dict) -> bool:
    return True


def squeeze(ctx, budget: int) -> None:
    """Lower the budget to the weights (everything not computing leaves the device), then put it back."""
    m = ctx.status()["memory"]
    try:
        ctx.set_budget(m["weights_bytes"] + m["overhead_bytes"] + 1)
    finally:
        ctx.set_budget(budget)


def hidden_state(c, sid: int) -> dict:
    """The paused hidden state as a client reads it: per-position statistics and the values (all of
    them up to MAX_COMPARED, else evenly spaced positions), to compare bit for bit as JSON."""
    s = c.inspect(sid)
    _, n, width = s["shape"]
    keep = max(1, MAX_COMPARED // width)
    positions = list(range(n)) if n <= keep else sorted({i * (n - 1) // max(1, keep - 1) for i in range(keep)})
    step = max(1, CHUNK // width)
    values = []
    for a in range(0, len(positions), step):
        values += c.inspect(sid, positions=positions[a:a + step])["values"]
    stats = {k: s[k] for k in ("mean", "std", "min", "max", "norm", "per_position")}
    return {"json": json.dumps([stats, values]), "values": len(values) * width, "of": n * width}


def timed_resume(c, sid: int) -> tuple[float, int | None]:
    t0 = time.perf_counter()
    token = c.resume(sid)
    return (time.perf_counter() - t0) * 1000, token


def measure(ctx, way: str, ids: list[int], layer: int, budget: int, idle_s: float, check: bool) -> dict:
    """One resume of one way: its ms and token, whether it swapped in, and (check) the hidden-state comparison."""
    c = ctx.client
    sid = ctx.create_session(token_ids=ids)
    out = {"way": way, "spawned": False}
    try:
        c.run_to(sid, layer=layer)
        out["spawned"] = True
        if way == "swap":
            before = hidden_state(c, sid) if check else None
            squeeze(ctx, budget)
            if check:  # read again (that swaps it in), then out again for the timed resume
                moved = c.session(sid)["location"] != "device"
                after = hidden_state(c, sid)
                out["hidden"] = {"after_swap": moved, "equal": after["json"] == before["json"],
                                 "values": after["values"], "of": after["of"]}
                squeeze(ctx, budget)
        time.sleep(idle_s)
        out["location"] = c.session(sid)["location"]
        ins = ctx.status()["swap"]["swap_ins"]
        if way == "recompute":  # what a user without Djinn does: drop it, and run the prompt again
            ctx.close_session(sid)
            t0 = time.perf_counter()
            sid = ctx.create_session(token_ids=ids)
            c.run_to(sid, layer=layer)
            out["token"] = c.resume(sid)
            out["ms"] = (time.perf_counter() - t0) * 1000
        else:
            out["ms"], out["token"] = timed_resume(c, sid)
        out["swapped_in"] = out["location"] != "device" and ctx.status()["swap"]["swap_ins"] > ins
    except DjinnError as e:
        out["error"] = f"{e.code}: {e}"
    finally:
        ctx.close_session(sid)
    return out


def run(ctx, p: dict):
    c = ctx.client
    st = ctx.daemon_status(p["model"])
    model = st["model"]
    n_layers = model["num_layers"]
    depths = {"early": 0, "middle": n_layers // 2, "late": n_layers - 1}
    lens = sorted(set(p["prompt_lens"]))
    budget = ctx.budget = st["memory"]["budget_bytes"]
    if not p["swap"]:
        ctx.set_swap(False)
    ctx.say(f"resume: {model['name']} ({n_layers} layers) on {st['device']['kind']}, prompts of "
            f"{', '.join(map(str, lens))} tokens paused after layers {sorted(set(depths.values()))}, "
            f"{p['repeats']} x {', '.join(WAYS)}, idle {p['idle_ms']} ms; swapping {'on' if p['swap'] else 'OFF'}")
    if p["swap"]:
        ctx.note("the swap way lowers the budget to the weights for a moment: every session not computing is "
                 "swapped out then, other clients' sessions too")
    ctx.begin()
    vocab, points, done = vocab_of(model), [], 0
    for n in lens:
        ids = prompt_ids(p["seed"], n, n, vocab)
        ref = ctx.create_session(token_ids=ids)
        reference = c.generate(ref, 1)[0]  # the same prompt, unpaused
        ctx.close_session(ref)
        for depth, layer in depths.items():
            runs = [measure(ctx, way, ids, layer, budget, p["idle_ms"] / 1000, check=r == 0)
                    for r in range(p["repeats"]) for way in WAYS]  # ways interleaved: drift hits all alike
            points.append(summarize_point(n, depth, layer, reference, runs))
            done += 1
            ms = points[-1]["ms"]
            ctx.progress(done, len(lens) * len(depths), f"{n} tokens, {depth} (layer {layer}): "
                         + ", ".join(f"{w} {_ms(ms[w])}" for w in WAYS))
    m = ctx.measure()

    flat = [r for pt in points for r in pt["runs"]]
    completed = [r for r in flat if r.get("token") is not None]
    errors = [r["error"] for r in flat if "error" in r]
    mismatched = [r for r in completed if r["token"] != r["reference"]]
    swap_runs = [r for r in flat if r["way"] == "swap"]
    swapped = sum(bool(r.get("swapped_in")) for r in swap_runs)
    held_moved = sum(r.get("location") not in (None, "device") for r in flat if r["way"] == "held")
    checks = [r["hidden"] for r in swap_runs if r.get("hidden", {}).get("after_swap")]
    hidden_bad = sum(not h["equal"] for h in checks)
    late = next(pt for pt in points if pt["prompt_len"] == lens[-1] and pt["depth"] == "late")
    late_swapped = all(r.get("swapped_in") for r in late["runs"] if r["way"] == "swap")
    sw, rc = late["ms"]["swap"], late["ms"]["recompute"]
    if held_moved:
        ctx.note(f"{held_moved} resumes of the held way found their session off the device (swapped out by "
                 "other demand): their latency includes a swap-in")

    where = f"at {lens[-1]} tokens, after layer {late['layer']}"
    if sw is None or rc is None:
        beats = crit(ctx, "swap_beats_recompute", f"{where}: no median (the resumes failed)", False)
    elif not late_swapped:
        beats = crit(ctx, "swap_beats_recompute", f"not measured {where}: the swap way's resumes did not swap in "
                     f"(swap {_ms(sw)}, recompute {_ms(rc)})", None)
    else:
        beats = crit(ctx, "swap_beats_recompute", f"{where}: swap {_ms(sw)} {'<' if sw < rc else '>='} recompute "
                     f"{_ms(rc)} ({rc / sw:.1f}x; held {_ms(late['ms']['held'])})", sw < rc)
    criteria = [
        crit(ctx, "all_complete", f"{len(completed)} of {len(flat)} resumes completed"
             + (f"; {errors[0]}" if errors else ""), len(completed) == len(flat)),
        crit(ctx, "tokens_equal", f"{len(mismatched)} of {len(completed)} tokens differ from the prompt run unpaused",
             not mismatched and bool(completed)),
        crit(ctx, "swapped", f"{swapped} swap-ins in {len(swap_runs)} resumes of the swap way", swapped == len(swap_runs) > 0),
        crit(ctx, "hidden_identical", f"{len(checks) - hidden_bad} of {len(checks)} hidden states equal after a "
             f"swap-out and swap-in ({_values(checks)})" if checks else "not checked: no paused session was swapped out",
             hidden_bad == 0 if checks else None),
        beats,
    ]

    png = plot(ctx.folder / "resume.png", points, lens, depths,
               f"resume latency by depth: {model['name']} on {st['device']['kind']}, median of {p['repeats']}"
               + ("" if p["swap"] else " (swapping off)"))
    table = "\n".join(f"  {pt['prompt_len']:>6} {pt['depth']:<7} {pt['layer']:>3}  "
                      + "  ".join(f"{_ms(pt['ms'][w]):>10}" for w in WAYS) for pt in points)
    ctx.say("  tokens depth  layer  " + "  ".join(f"{w:>10}" for w in WAYS) + "\n" + table)
    headline = {"prompt_len": lens[-1], "layer": late["layer"], "swap_ms": sw, "held_ms": late["ms"]["held"],
                "recompute_ms": rc, "recompute_over_swap": round(rc / sw, 2) if sw and rc else None}
    spawned = sum(r["spawned"] for r in flat)
    body = {"headline": headline, "figure": png, "depths": depths, "points": points,
            "capacity_math": capacity_math(model, 1, lens[-1], budget),
            "num_sessions_requested": len(flat), "num_sessions_spawned": spawned,
            "num_sessions_completed": len(completed), "errors": errors,
            "integrity": {"checked_sessions": len(completed), "mismatches": len(mismatched),
                          "hidden_checked": len(checks), "hidden_mismatches": hidden_bad},
            **m}
    return body, criteria


def summarize_point(n: int, depth: str, layer: int, reference: int, runs: list[dict]) -> dict:
    for r in runs:
        r["reference"] = reference
        if "ms" in r:
            r["ms"] = round(r["ms"], 3)
    ms = {w: median([r["ms"] for r in runs if r["way"] == w and r.get("token") is not None]) for w in WAYS}
    return {"prompt_len": n, "depth": depth, "layer": layer, "reference_token": reference,
            "ms": {w: None if v is None else round(v, 3) for w, v in ms.items()}, "runs": runs}


def plot(path, points: list[dict], lens: list[int], depths: dict, title: str) -> str:
    """One panel per prompt length: the median resume latency at each depth, one line per way."""
    with figure(path, 1, len(lens), title=title, size=(4.2 * len(lens) + 0.6, 4.2)) as axes:
        for ax, n in zip(axes, lens):
            pts = [pt for pt in points if pt["prompt_len"] == n]
            xs = range(len(pts))
            for way, marker in zip(WAYS, "os^"):
                ys = [float("nan") if pt["ms"][way] is None else pt["ms"][way] for pt in pts]
                ax.plot(xs, ys, marker=marker, label=way)
            ax.set_xticks(list(xs), [f"{pt['depth']}\nlayer {pt['layer']}" for pt in pts])
            ax.set_title(f"{n}-token prompt")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("resume latency (ms)")
        axes[0].legend(fontsize="small")
    return str(path)


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f} ms"


def _values(checks: list[dict]) -> str:
    return ", ".join(sorted({f"{h['values']} of {h['of']} values" for h in checks}))
