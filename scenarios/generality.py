"""generality: every model family through the same checks, each model on a private djinnd of its own
(see generality.toml).

The references are outside djinnd: transformers' own `generate` and forward on the same weights,
loaded in this process, and the bytes a transformers DynamicCache holds.
"""

import re
import threading
from concurrent.futures import ThreadPoolExecutor

from djinnd import DjinnError, PrivateDaemon, PrivateDaemonError, estimate

from .common import Skip
from .exp3_plan import crit

CHECKS = ("tokens", "batched", "pause_every_layer", "swap", "capacity_math", "lens")
BATCH_ROWS = 4


def needs_daemon(p: dict) -> bool:
    return False  # it starts one per model


def run(ctx, p: dict):
    names = [n.strip() for n in p["models"].split(",") if n.strip()]
    if not names:
        raise Skip("no models given")
    ctx.progress(0, len(names), f"{len(names)} models, a daemon each, {p['ahead']} started ahead")
    rows, device = [], None
    with ThreadPoolExecutor(p["ahead"] or 1) as pool:  # a daemon's start is mostly imports: it overlaps the checks
        starts = {}
        try:
            for i, name in enumerate(names):
                for ahead in names[i:i + 1 + p["ahead"]]:
                    if ahead not in starts:
                        starts[ahead] = pool.submit(_start, ctx, ahead, p)
                daemon = starts[name].result()
                del starts[name]  # from here _row removes it
                row, st = _row(ctx, name, p, daemon)
                device = device or (st and {k: st["device"][k] for k in ("kind", "name", "capacity_bytes")})
                rows.append(row)
                ctx.say(_line(row))
                ctx.progress(i + 1, len(names), f"{name} checked")
        finally:  # an interrupted run leaves no daemon started ahead behind
            for started in starts.values():
                try:
                    if isinstance(started.result(), PrivateDaemon):
                        started.result().remove()
                except Exception:  # noqa: BLE001, S110 - the others still go
                    pass
    loaded = [r for r in rows if r["loads"]["ok"]]
    criteria = [crit(ctx, "loads", _failures(rows, "loads"), len(loaded) == len(rows))]
    for check in CHECKS:
        criteria.append(crit(ctx, check, _failures(loaded, check), all(r[check]["ok"] for r in loaded) and bool(loaded)))
    passed = sum(all(r[k]["ok"] for k in ("loads", *CHECKS) if k in r) for r in rows)
    body = {"device": device, "model": None, "models": rows, "checks": ["loads", *CHECKS],
            "headline": {"models": len(rows), "all_checks_passed": passed}}
    return body, criteria


def _start(ctx, name: str, p: dict) -> PrivateDaemon | str:
    """A daemon serving `name`, or why it would not start (its one line)."""
    logs = ctx.folder / "daemons" / re.sub(r"[^\w.-]+", "_", name)
    try:
        return PrivateDaemon("--device", p["device"], "--model", name, logs=logs).start(timeout=900)
    except PrivateDaemonError as e:
        return str(e)


def _row(ctx, name: str, p: dict, daemon: PrivateDaemon | str) -> tuple[dict, dict | None]:
    """One model's checks on its daemon: {check: {"ok", "measured"}} and its status."""
    row = {"model": name, "family": None}
    if isinstance(daemon, str):
        row["loads"] = {"ok": False, "measured": daemon}
        return row, None
    try:
        with daemon.client() as c:
            st = c.status()
            m = st["model"]
            row["family"] = m.get("family")
            row["loads"] = {"ok": True, "measured": f"{m.get('family')}, {m['num_layers']} layers, "
                                                   f"loaded in {m.get('load_seconds')} s"}
            try:
                checks = _Checks(c, st, p)
            except Exception as e:  # noqa: BLE001 - the row fails with the reason; the other models still run
                checks = f"the reference in this process could not be made: {type(e).__name__}: {e}"
            for check in CHECKS:
                try:
                    if isinstance(checks, str):
                        raise RuntimeError(checks)
                    ok, measured = getattr(checks, check)()
                except DjinnError as e:
                    ok, measured = False, f"{e.code}: {e}"
                except Exception as e:  # noqa: BLE001 - a failed check is a failed cell, not a failed run
                    ok, measured = False, f"{type(e).__name__}: {e}"
                row[check] = {"ok": ok, "measured": measured}
    finally:
        daemon.remove()
    return row, st


class _Checks:
    """The checks of one model, against the same weights loaded in this process."""

    def __init__(self, c, st: dict, p: dict):
        from djinnd import load_model, parse_dtype

        self.c, self.model, self.n = c, st["model"], p["tokens"]
        dev = st["device"]
        device = f"cuda:{dev['index'] or 0}" if dev["kind"] == "cuda" else "cpu"
        self.lm = load_model(self.model["path"] or self.model["name"], device, parse_dtype(dev["dtype"]))
        self.ids = self.lm.encode(p["prompt"])
        self.layers = self.model["num_layers"]
        self.ref = self._generate()
        self.plain, self.charged = None, None

    def _tensor(self):
        import torch
        return torch.tensor([self.ids], device=self.lm.device)

    def _generate(self) -> list[int]:
        """transformers' own greedy decoding (it may stop early at an end-of-text token), under a fresh
        generation config: a checkpoint's own may add a repetition penalty or other logits processors,
        which generate merges into any config it is given, and then it is not plain greedy decoding."""
        import torch
        from transformers import GenerationConfig

        model = self.lm.model  # this process's own copy
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) and eos else eos) or 0
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
        ids = self._tensor()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.n, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    def _session(self) -> int:
        return self.c.create_session(token_ids=self.ids)

    def _finish(self, sid: int) -> tuple[list[int], int]:
        """Resume a paused session to the end of its forward, then decode the rest of the n tokens;
        and how many more pauses it met."""
        pauses, token = 0, self.c.resume(sid)
        while token is None:
            pauses, token = pauses + 1, self.c.resume(sid)
        return [token] + (self.c.generate(sid, self.n - 1) if self.n > 1 else []), pauses

    def _same(self, tokens: list[int]) -> tuple[bool, str]:
        k = len(self.ref)
        if tokens[:k] == self.ref:
            return True, f"{k} tokens equal" + (" (generate stopped at an end token)" if k < self.n else "")
        return False, f"djinnd {tokens[:k]} vs generate {self.ref}"

    def tokens(self):
        sid = self._session()
        try:
            self.plain = self.c.generate(sid, self.n)
            self.charged = self.c.session(sid)["device_bytes"]
        finally:
            self.c.close(sid)
        return self._same(self.plain)

    def batched(self):
        """Sessions of prompts of different lengths, decoded token by token at once (a client each,
        their steps sent together): each gets from the daemon's batches the tokens it gets alone.
        In this process the same steps batched (LoadedModel.compare_batched) give every row's
        logits within 1e-4 (fp32) of its unbatched step's."""
        prompts = [self.ids[:max(1, len(self.ids) - k)] for k in range(BATCH_ROWS)]
        alone, diff, _ = self.lm.compare_batched(prompts, self.n)
        sids = [self.c.create_session(token_ids=p) for p in prompts]
        got, before = [[] for _ in prompts], self.c.status()["scheduler"]["batches"]
        together = threading.Barrier(len(prompts))

        def decode(i):
            with self.c.twin(120) as c:
                for _ in range(self.n):
                    together.wait(60)
                    got[i] += c.generate(sids[i], 1)
        try:
            threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
        finally:
            for sid in sids:
                self.c.close(sid)
        after = self.c.status()["scheduler"]["batches"]
        rows = after["rows"] - before["rows"]
        forwards = after["forwards"] - before["forwards"]
        tol_ok = diff <= 1e-4 or self.model.get("dtype") != "float32"
        ok = got == alone and rows > forwards and tol_ok
        return ok, (f"{len(prompts)} sessions x {self.n} tokens: {rows} decode steps in {forwards} forwards (largest "
                    f"batch {after['largest']}): tokens {'equal' if got == alone else 'DIFFER'} to each alone; "
                    f"largest logit difference {diff:.1e}")

    def pause_every_layer(self):
        sid = self._session()
        try:
            self.c.run_to(sid, layers=list(range(self.layers)))
            tokens, more = self._finish(sid)
        finally:
            self.c.close(sid)
        ok, measured = self._same(tokens)
        return ok and 1 + more == self.layers, f"{1 + more} pauses in {self.layers} layers; {measured}"

    def swap(self):
        sid = self._session()
        positions = list(range(min(len(self.ids), 65536 // self.model["hidden_size"])))
        try:
            self.c.run_to(sid, layers=[self.layers // 2])
            before = self.c.inspect(sid, positions=positions)["values"]
            mem, info = self.c.status()["memory"], self.c.session(sid)
            self.c.set_budget(mem["device_bytes"] - info["device_bytes"] + 1)  # it no longer fits
            try:
                out = self.c.session(sid)
            finally:
                self.c.set_budget(mem["budget_bytes"])
            after = self.c.inspect(sid, positions=positions)["values"]  # swapped back in to be read
            tokens, _ = self._finish(sid)
        finally:
            self.c.close(sid)
        stored = out["host_bytes"] + out["disk_bytes"]
        same, measured = self._same(tokens)
        return (out["location"] != "device" and after == before and same,
                f"out to {out['location']} ({stored} B) and back: hidden state "
                f"{'bit-exact' if after == before else 'CHANGED'}; {measured}")

    def capacity_math(self):
        import torch
        from transformers import DynamicCache

        with torch.inference_mode():
            cache = DynamicCache(config=self.lm.model.config)
            self.lm.forward(self._tensor(), cache)
        # per token each layer keeps (a sliding-window layer keeps fewer tokens; the slab keeps them all)
        per_token = sum((x.keys.nbytes + x.values.nbytes) // x.keys.shape[-2] for x in cache.layers)
        want = estimate({**self.model, "kv_bytes_per_token": per_token}, len(self.ids), self.n)["kv_bytes"]
        ok = per_token == self.model["kv_bytes_per_token"] and self.charged == want
        return ok, (f"a DynamicCache holds {per_token} B a token (the daemon says {self.model['kv_bytes_per_token']}); "
                    f"charged {self.charged} B after {self.n} tokens, the math says {want} B")

    def lens(self):
        import torch

        with torch.inference_mode():
            probs = torch.softmax(self.lm.model(input_ids=self._tensor()).logits[0, -1].float(), dim=-1)
        want = probs.topk(5)
        sid = self._session()
        try:
            self.c.run_to(sid, layers=[self.layers - 1])
            got = self.c.lens(sid, top_k=5)["top"]
            token = self.c.resume(sid)
        finally:
            self.c.close(sid)
        diff = max(abs(t["prob"] - q) for t, q in zip(got, want.values.tolist()))
        tol = 1e-4 if self.model.get("dtype") == "float32" else 2e-2
        ok = [t["token"] for t in got] == want.indices.tolist() and diff < tol and token == got[0]["token"]
        return ok, f"top-5 {'equal' if ok else [t['token'] for t in got]}, largest probability difference {diff:.1e}"


def _failures(rows: list[dict], check: str) -> str:
    bad = [f"{r['model']}: {r[check]['measured']}" for r in rows if not r[check]["ok"]]
    return f"{len(rows) - len(bad)} of {len(rows)} models" + (f"; {bad[0]}" if bad else "")


def _line(row: dict) -> str:
    cells = " ".join(f"{k}={'ok' if row[k]['ok'] else 'FAIL'}" for k in ("loads", *CHECKS) if k in row)
    return f"{row['model']:<16} {row['family'] or '?':<10} {cells}"
