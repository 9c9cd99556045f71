"""conversation: a chat whose session keeps its KV across turns, against re-sending the history (conversation.toml).

The two ways run interleaved, turn by turn (kept, then resend), so that both meet the same state
of the machine. Each way keeps its own history (its own replies), so the replies are computed
independently and their equality is a real check. A turn's time runs from its first request to
its last reply token; closing the resend way's session afterwards is not counted.
"""

import time

from djinnd import DjinnError

from .common import capacity_math, median, prompt_ids, vocab_of
from .exp3_plan import crit
from .figures import figure

WAYS = ("kept", "resend")


def needs_daemon(p: dict) -> bool:
    return True


class _Way:
    """One way of holding the chat: its history, its session (kept) and its per-turn figures."""

    def __init__(self, ctx, name: str, keep: bool):
        self.ctx, self.name, self.keep = ctx, name, keep
        self.history: list[int] = []
        self.sid: int | None = None
        self.sessions = 0
        self.turns: list[dict] = []

    def turn(self, user: list[int], n: int) -> dict:
        """The reply to `user`: (kept) appended to the kept session, else a fresh session of the whole history."""
        c, t0 = self.ctx.client, time.perf_counter()
        if self.keep and self.sid is not None:
            sid, fed = self.sid, 1 + len(user)  # the last reply token, not yet in the KV, and the message
            c.append(sid, user)
        else:
            sid, fed = self.ctx.create_session(token_ids=self.history + user), len(self.history) + len(user)
            self.sessions += 1
            if self.keep:
                self.sid = sid
        reply = c.generate(sid, 1)
        ttft = time.perf_counter() - t0
        if n > 1:
            reply += c.generate(sid, n - 1)
        took = time.perf_counter() - t0
        if not self.keep:
            self.ctx.close_session(sid)
        self.history += user + reply
        row = {"turn": len(self.turns) + 1, "fed_tokens": fed, "ttft_ms": round(ttft * 1000, 3),
               "turn_ms": round(took * 1000, 3), "reply": reply}
        self.turns.append(row)
        return row


def run(ctx, p: dict):
    st = ctx.daemon_status(p["model"])
    model = st["model"]
    ctx.budget = st["memory"]["budget_bytes"]
    T, vocab = p["turns"], vocab_of(model)
    if not p["keep"]:
        ctx.note("keep = off: the kept way re-sends the whole history each turn too (the mechanism is switched off)")
    ctx.say(f"conversation: {T} turns of {p['user_tokens']} user tokens and {p['reply_tokens']} reply tokens, "
            f"KV kept{'' if p['keep'] else ' (off)'} against the history re-sent; {model['name']} on {st['device']['kind']}")
    ctx.begin()
    ways = {"kept": _Way(ctx, "kept", p["keep"]), "resend": _Way(ctx, "resend", False)}
    error = None
    try:
        for t in range(1, T + 1):
            user = prompt_ids(p["seed"], t, p["user_tokens"], vocab)
            rows = {name: w.turn(user, p["reply_tokens"]) for name, w in ways.items()}
            same = rows["kept"]["reply"] == rows["resend"]["reply"]
            ctx.progress(t, T, f"turn {t}: first token kept {rows['kept']['ttft_ms']:.1f} ms, resend "
                         f"{rows['resend']['ttft_ms']:.1f} ms ({rows['resend']['fed_tokens']} tokens re-sent)"
                         + ("" if same else "; replies differ"))
    except DjinnError as e:  # reported by all_complete, with the turns that did complete
        error = f"{e.code}: {e}"
    finally:
        if ways["kept"].sid is not None:
            ctx.close_session(ways["kept"].sid)
    m = ctx.measure()
    png = _plot(ctx.folder / "conversation.png", ways, model["name"], st["device"]["kind"], p["keep"])
    return _verdict(ctx, p, ways, error, m, png, model)


def _plot(path, ways: dict, model: str, device: str, keep: bool) -> str:
    with figure(path, 1, 1, title=f"conversation: time to first token per turn, {model} on {device}") as (ax,):
        for w, style in zip(ways.values(), ("-o", "--s")):
            label = "KV kept (append)" if w.keep else "history re-sent"
            if w.name == "kept" and not keep:
                label = "kept way, keep off (re-sent)"
            ax.plot([r["turn"] for r in w.turns], [r["ttft_ms"] for r in w.turns], style, label=label)
        ax.set_xlabel("turn")
        ax.set_ylabel("time to first token (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    return str(path)


def _verdict(ctx, p: dict, ways: dict, error, m: dict, png: str, model: dict):
    T = p["turns"]
    kept, resend = (ways[k].turns for k in WAYS)
    done = min(len(kept), len(resend))
    differ = [r["turn"] for r, q in zip(kept, resend) if r["reply"] != q["reply"]]
    criteria = [
        crit(ctx, "all_complete", f"{done} of {T} turns, both ways" + (f"; {error}" if error else ""),
             done == T and not error),
        crit(ctx, "tokens_equal", f"{len(differ)} of {done} turns differ"
             + (f" (first: turn {differ[0]})" if differ else ""), done > 0 and not differ),
    ]
    want = ctx.scenario.criteria["ttft_kept_lower"]["max_ratio"]
    last = T // 2  # the last ceil(T/2) turns start at index T // 2
    a, b = (median([r["ttft_ms"] for r in x[last:]]) for x in (kept, resend))
    ratio = a / b if a is not None and b else None
    if done == T:
        criteria.append(crit(ctx, "ttft_kept_lower", f"turns {last + 1}-{T}: kept median {a:.1f} ms, resend median "
                             f"{b:.1f} ms: {ratio:.2f}x (needs <= {want}x)", ratio <= want))
    else:
        criteria.append(crit(ctx, "ttft_kept_lower", "not measured: the chat did not complete", False))
    for name, rows in (("kept", kept), ("resend", resend)):
        ctx.say(f"{name:<6} first token ms: " + ", ".join(f"{r['ttft_ms']:.1f}" for r in rows))
    history = len(ways["resend"].history)
    k, r = (x[done - 1]["ttft_ms"] if done else None for x in (kept, resend))  # the last turn both ways completed
    headline = {"turns": done, "mismatches": len(differ), "last_ttft_ms_kept": k, "last_ttft_ms_resend": r,
                "last_ttft_ratio": round(k / r, 3) if done else None,
                "median_ttft_ratio_last_half": round(ratio, 3) if ratio is not None else None,
                "history_tokens": history}
    spawned = sum(w.sessions for w in ways.values())
    completed = len(resend) + (len(kept) if not p["keep"] else int(len(kept) == T))  # a kept session ends with the chat
    body = {"turns": {k: ways[k].turns for k in WAYS}, "headline": headline, "figure": png,
            "capacity_math": capacity_math(model, 2, max(history, 1), ctx.budget),  # the kept session and one resent
            "num_sessions_requested": spawned, "num_sessions_spawned": spawned,
            "num_sessions_completed": completed,
            "integrity": {"checked_sessions": done, "mismatches": len(differ)}, **m}
    return body, criteria
