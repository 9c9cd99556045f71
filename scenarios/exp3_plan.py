"""exp3's plan, shared by djinn's run (exp3.py) and the hold-all baseline (baseline.py): the
breakpoints, the budget and the capacity math, and how a criterion is reported."""

from djinnd import format_size

from .common import Skip, breakpoints, capacity_math, math_lines


def resolve_budget(p: dict, model: dict, daemon_budget: int) -> int:
    """auto: weights + budget_fraction of the N sessions' bytes; daemon: its own; else the SIZE given."""
    if p["budget"] == "auto":
        m = capacity_math(model, p["sessions"], p["prompt_len"], 0)
        return m["weights_bytes"] + int(p["budget_fraction"] * p["sessions"] * m["bytes_per_session"])
    if p["budget"] == "daemon":
        return daemon_budget
    return p["budget"]


def plan(ctx, p: dict, model: dict, daemon_budget: int) -> tuple[list[int], dict]:
    """Breakpoints and the capacity math, printed; Skip when not even one session fits."""
    layers = breakpoints(p["breakpoints"], model["num_layers"])
    budget = resolve_budget(p, model, daemon_budget)
    math = capacity_math(model, p["sessions"], p["prompt_len"], budget)
    ctx.say(f"capacity math: {model['name']} ({model.get('dtype')}, {model['num_layers']} layers), "
            f"{p['sessions']} sessions of {p['prompt_len']} tokens paused at layers {layers}")
    for line in math_lines(math, format_size):
        ctx.say("  " + line)
    one = math["weights_bytes"] + math["bytes_per_session"]
    if budget < one:
        raise Skip(f"budget {format_size(budget)} is too small for even one session: weights "
                   f"{format_size(math['weights_bytes'])} + one session {format_size(math['bytes_per_session'])}"
                   f" = {format_size(one)}")
    return layers, math


def effective(p: dict, layers: list[int], math: dict) -> dict:
    """The parameters as run: `auto` breakpoints and budget resolved (the rule kept beside)."""
    return {**p, "breakpoints": layers, "budget": math["budget_bytes"], "budget_rule": p["budget"]}


def crit(ctx, cid: str, measured: str, ok) -> dict:
    return {"id": cid, "text": ctx.scenario.criteria[cid]["text"], "measured": measured, "ok": ok}


def fmt(n) -> str:
    return "unknown" if n is None else format_size(n)
