"""steering: patch the hidden state at a breakpoint and resume (see steering.toml).

Scaling: each prompt's greedy tokens with every forward paused after the layer and scaled, against
the same prompt run unpaused; a changed token is a position where the two differ (a change early on
carries into later positions, as it would for a user). Activation addition: the next-token
distribution read with the logit lens at the last layer, which is the model's own, so the shift is
what the addition did to the model's prediction.
"""

from .common import Skip, breakpoints, capacity_math
from .exp3_plan import crit

PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "The best way to learn programming is",
    "My favourite season of the year is",
    "To make a cup of tea, first",
    "The weather today is",
)
REFERENCE = {"model": "gpt2", "layer": 6, "scale": 0.9, "changed_fraction": 0.0039}


def needs_daemon(p: dict) -> bool:
    return True


class _Sessions:
    """One session per measurement, closed when it is done (the harness closes any left on an error)."""

    def __init__(self, ctx):
        self.ctx, self.count, self.prompt_tokens = ctx, 0, 0

    def run(self, prompt: str, fn):
        sid = self.ctx.create_session(prompt=prompt)
        self.count += 1
        try:
            out = fn(sid)
            self.prompt_tokens = max(self.prompt_tokens, self.ctx.client.session(sid)["prompt_tokens"])
            return out
        finally:
            self.ctx.close_session(sid)


def scaled_tokens(c, sid: int, layer: int, scale: float, n: int) -> list[int]:
    """n greedy tokens, each forward paused after `layer` with its hidden state (every position) scaled."""
    out = []
    for _ in range(n):
        c.run_to(sid, layers=[layer])
        c.patch(sid, scale=scale)
        out.append(c.resume(sid))
    return out


def last_hidden(c, sid: int, layer: int) -> list[float]:
    """The prompt's last position's hidden state after `layer`."""
    c.run_to(sid, layers=[layer])
    return c.inspect(sid, positions=[-1])["values"][0]


def next_token(c, sid: int, layer: int, last: int, add, top_k: int) -> tuple[list[dict], int]:
    """The lens's top-k at the last layer, `add` added to the last position after `layer` (None: unpatched),
    and the token the forward then produces."""
    c.run_to(sid, layers=[layer, last])
    if add is not None:
        c.patch(sid, add=add, positions=[-1])
    if layer != last:
        c.resume(sid)  # pauses again, at the last layer
    top = c.lens(sid, top_k=top_k)["top"]
    return top, c.resume(sid)


def total_variation(a: list[dict], b: list[dict]) -> float:
    """Half the summed |p - q| over the union of two top-k lists; a token outside one list counts as 0 there."""
    pa, pb = ({t["token"]: t["prob"] for t in x} for x in (a, b))
    return 0.5 * sum(abs(pa.get(t, 0.0) - pb.get(t, 0.0)) for t in pa.keys() | pb.keys())


def run(ctx, p: dict):
    st = ctx.daemon_status(p["model"])
    model = st["model"]
    layer = breakpoints([p["layer"]], model["num_layers"])[0]
    last = model["num_layers"] - 1
    ctx.budget = st["memory"]["budget_bytes"]
    sessions = _Sessions(ctx)
    sc, ad = _scaling(ctx, p, layer, sessions), _addition(ctx, p, layer, last, model, sessions)

    criteria = [
        crit(ctx, "scale_changes", f"{sc['changed']} of {sc['total']} tokens changed ({sc['changed_fraction']:.2%})"
             f" at x{p['scale']} after layer {layer}", sc["changed"] > 0),
        crit(ctx, "deterministic", f"{sc['repeat_differs']} of {sc['total']} tokens differ between the two steered runs",
             sc["repeat_differs"] == 0),
        crit(ctx, "identity", f"{sc['identity_changed']} of {sc['total']} tokens changed at x1.0",
             sc["identity_changed"] == 0),
    ]
    if ad is None:
        why = "skipped: the daemon's model has no logit lens"
        criteria += [crit(ctx, cid, why, None) for cid in ("zero_addition", "addition_shifts")]
    else:
        criteria += [
            crit(ctx, "zero_addition", f"total variation {ad['zero_shift']:.3g}", ad["zero_shift"] == 0),
            crit(ctx, "addition_shifts", f"total variation {ad['shift']:.3g} at coef {p['coef']}; top-1 "
                 f"{ad['top1_before']!r} -> {ad['top1_after']!r}", ad["shift"] > 0),
        ]
    headline = {"changed_fraction": sc["changed_fraction"], "identity_changed": sc["identity_changed"],
                "deterministic": sc["repeat_differs"] == 0}
    if ad is not None:
        headline |= {"addition_shift": ad["shift"], "top1_before": ad["top1_before"], "top1_after": ad["top1_after"]}
    n = sessions.count  # one at a time, each closed when done: every one spawned completed
    body = {"scaling": sc, "addition": ad, "reference": REFERENCE, "headline": headline,
            "capacity_math": capacity_math(model, 1, sessions.prompt_tokens + p["tokens"], ctx.budget),
            "num_sessions_requested": n, "num_sessions_spawned": n, "num_sessions_completed": n,
            "integrity": {"checked_sessions": len(sc["prompts"]),  # x1.0 against unpaused, per prompt
                          "mismatches": sum(r["identity_changed"] > 0 for r in sc["prompts"])},
            **ctx.measure()}
    return body, criteria


def _scaling(ctx, p: dict, layer: int, sessions: _Sessions) -> dict:
    """Per prompt: unpaused, steered twice, and at scale 1.0; the positions where each differs."""
    c, n, prompts = ctx.client, p["tokens"], PROMPTS[:p["prompts"]]
    ctx.say(f"steering: {len(prompts)} prompts x {n} tokens, hidden state after layer {layer} scaled by {p['scale']}")
    rows = []
    for i, prompt in enumerate(prompts, 1):
        base = sessions.run(prompt, lambda sid: c.generate(sid, n))
        steered, again, same = (sessions.run(prompt, lambda sid, s=s: scaled_tokens(c, sid, layer, s, n))
                                for s in (p["scale"], p["scale"], 1.0))
        diff = [k for k, (a, b) in enumerate(zip(base, steered)) if a != b]
        rows.append({"prompt": prompt, "baseline": base, "steered": steered, "changed": len(diff),
                     "first_change": diff[0] if diff else None,
                     "repeat_differs": sum(a != b for a, b in zip(steered, again)),
                     "identity_changed": sum(a != b for a, b in zip(base, same))})
        ctx.progress(i, len(prompts) + 1, f"{prompt!r}: {len(diff)} of {n} tokens changed")
    total = n * len(rows)
    sums = {k: sum(r[k] for r in rows) for k in ("changed", "repeat_differs", "identity_changed")}
    frac = round(sums["changed"] / total, 4)
    ctx.say(f"steering: {sums['changed']} of {total} tokens changed ({frac:.2%}; GPT-2's reference "
            f"{REFERENCE['changed_fraction']:.2%}); repeated run differs in {sums['repeat_differs']}, "
            f"x1.0 changed {sums['identity_changed']}")
    return {"layer": layer, "scale": p["scale"], "tokens_per_prompt": n, "total": total, **sums,
            "changed_fraction": frac, "prompts": rows}


def _addition(ctx, p: dict, layer: int, last: int, model: dict, sessions: _Sessions) -> dict | None:
    """coef x (plus - minus) at layer, added to the target's last position: the lens's next tokens before and after."""
    if not model.get("lens", True):
        ctx.note(f"the daemon's model {model['name']} has no logit lens: activation addition not measured")
        return None
    c, k = ctx.client, p["top_k"]
    plus, minus = (sessions.run(text, lambda sid: last_hidden(c, sid, layer)) for text in (p["plus"], p["minus"]))
    direction = [a - b for a, b in zip(plus, minus)]
    norm = sum(x * x for x in direction) ** 0.5
    if not norm:
        raise Skip(f"'{p['plus']}' and '{p['minus']}' have the same hidden state after layer {layer}: no direction")
    runs = {}
    for name, add in (("unpatched", None), ("zero", [0.0] * len(direction)),
                      ("steered", [p["coef"] * x for x in direction])):
        top, token = sessions.run(p["target"], lambda sid: next_token(c, sid, layer, last, add, k))
        runs[name] = {"top": top, "token": token}
    before, zero, after = (runs[x]["top"] for x in ("unpatched", "zero", "steered"))
    out = {"plus": p["plus"], "minus": p["minus"], "target": p["target"], "layer": layer, "lens_layer": last,
           "coef": p["coef"], "top_k": k, "direction_norm": round(norm, 4),
           "zero_shift": total_variation(before, zero), "shift": total_variation(before, after),
           "top1_before": before[0]["text"], "top1_after": after[0]["text"],
           "lens_top1_is_token": all(r["top"][0]["token"] == r["token"] for r in runs.values()), "runs": runs}
    ctx.progress(p["prompts"] + 1, p["prompts"] + 1, f"activation addition: shift {out['shift']:.3f}")
    ctx.say(f"activation addition: {p['coef']} x ('{p['plus']}' - '{p['minus']}') after layer {layer} "
            f"(norm {norm:.1f}) on '{p['target']}': total variation {out['shift']:.3f} over the top {k}; "
            f"0 x it: {out['zero_shift']}")
    for label, top in (("before", before), ("after ", after)):
        ctx.say(f"  {label} " + ", ".join(f"{t['text']!r} {t['prob']:.3f}" for t in top[:5]))
    return out
