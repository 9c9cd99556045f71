"""exp3's `baseline=hold-all`: the same sessions in plain PyTorch in this process, holding everything.

What a user without Djinn does: load the model, prefill each session's prompt into a transformers
DynamicCache, keep the activations seen at the breakpoints, and hold all of it. The device memory
that needs is measured from the tensors held (on CUDA: torch.cuda.max_memory_allocated, and a
real out-of-memory error ends it). Labelled a baseline in results.json; nothing here is djinn.
"""

from djinnd import default_budget, default_capacity, format_size, utc_stamp

from .common import prompt_ids, vocab_of
from .exp3_plan import crit, effective, plan


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def hold_all(ctx, p: dict):
    import torch
    from transformers import DynamicCache

    from djinnd import load_model



    device = torch.device("cuda:0" if ctx.kind == "cuda" else "cpu")
    cuda = device.type == "cuda"
    if cuda and ctx.client is not None:
        ctx.note("djinnd holds memory on this GPU too: the baseline may run out sooner than on an idle card")
    lm = load_model(p["model"], device)
    model = lm.describe()
    capacity = default_capacity(device)
    if ctx.client is not None:
        daemon_budget = ctx.status()["memory"]["budget_bytes"]
    else:
        daemon_budget = default_budget(device, capacity, lm.weights_bytes)
    layers, math = plan(ctx, p, model, daemon_budget)
    budget, n = math["budget_bytes"], p["sessions"]
    ctx.budget, ctx.capacity = budget, capacity
    ctx.begin()

    captured: list = []
    hooks = [lm.decoder_layers()[i].register_forward_hook(
        lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out)) for i in layers]
    held, progression, total = [], [], 0
    over_at = oom_at = None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for i in range(1, n + 1):
            ids = torch.tensor([prompt_ids(p["seed"], i, p["prompt_len"], vocab_of(model))], device=device)
            cache = DynamicCache(config=lm.model.config)
            captured = []
            try:
                with torch.no_grad():
                    logits = lm.forward(ids, cache)
            except torch.cuda.OutOfMemoryError:
                oom_at = i
                ctx.say(f"baseline: out of device memory at session {i}")
                break
            kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
            total += _bytes(kv + captured + [logits])
            held.append((cache, captured, logits))
            used = torch.cuda.memory_allocated(device) if cuda else lm.weights_bytes + total
            ctx.sample(used)
            if used > budget and over_at is None:
                over_at = i
            progression.append({"session": i, "used_bytes": used, "held_bytes": total, "timestamp": utc_stamp()})
            ctx.progress(i, n, f"baseline holds {i} sessions: {format_size(used)}")
    finally:
        for h in hooks:
            h.remove()
    peak = torch.cuda.max_memory_allocated(device) if cuda else lm.weights_bytes + total
    per = total // len(held) if held else None
    del held
    if cuda:
        torch.cuda.empty_cache()

    m = ctx.measure(local=True)
    vs = m["vram_stats"]
    vs["max_bytes"] = max(peak, vs["max_bytes"] or 0)
    reached = len(progression)
    criteria = [
        crit(ctx, "all_complete", f"held {reached} of {n} sessions"
              + (f" (out of device memory at session {oom_at})" if oom_at else ""), reached == n),
        crit(ctx, "peak_under_budget", f"needed {format_size(peak)} vs budget {format_size(budget)}"
              + (f"; over the budget from session {over_at}" if over_at else ""), peak <= budget),
        crit(ctx, "swapping_when_needed", "plain PyTorch never swaps; the math "
              + ("says it must" if math["expected_swapping"] else "says all fit"), not math["expected_swapping"]),
        {"id": "integrity", "text": ctx.scenario.criteria["integrity"]["text"],
         "measured": "not checked: the baseline is the unpaused reference", "ok": None},
    ]
    body = {"baseline": {"kind": "hold-all",
                         "label": "baseline: plain PyTorch in-process, holding everything (not djinn)",
                         "held_bytes": total, "held_bytes_per_session": per, "peak_bytes": peak,
                         "exceeds_budget_at_session": over_at, "oom_at_session": oom_at,
                         "measured_by": "torch.cuda.max_memory_allocated" if cuda else "bytes of the tensors held"},
            "device": {"kind": device.type, "name": torch.cuda.get_device_name(device) if cuda else "cpu (in-process)",
                       "capacity_bytes": capacity},
            "model": model, "params": effective(p, layers, math), "capacity_math": math, "breakpoints": layers,
            "num_sessions_requested": n,
            "num_sessions_spawned": reached, "num_sessions_completed": reached, "vram_progression": progression,
            "integrity": {"checked_sessions": 0, "mismatches": 0},
            "headline": {"peak_bytes": peak, "over_budget_at": over_at}, **m, "vram_stats": vs}
    return body, criteria
