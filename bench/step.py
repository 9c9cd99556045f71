"""One decode step through djinnd's runtime, in one process, against the bare transformers loop.

The RPC loop answers a token-by-token client with `Runtime.steps_now`; this times it without the
socket, next to the least a step can cost: the same model, a plain greedy loop over a DynamicCache
under inference_mode, on the same thread. `steps_now` (one session) is timed twice: alone (no forward that may
pause is open, so the layer hooks are off) and beside a session paused at a breakpoint (hooks on).
Runs of each way alternate; the figures are medians, and each ratio is paired run by run.

    python bench/step.py [--tokens 64] [--runs 25] [--device cpu]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import load_line, machine_line  # noqa: E402
from djinnd.models import load_model  # noqa: E402
from djinnd.runtime import Runtime  # noqa: E402
from djinnd.telemetry import EventBus  # noqa: E402
from scenarios.decode import greedy_decode  # noqa: E402

PROMPT = list(range(5, 37))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per run")
    ap.add_argument("--runs", type=int, default=25, help="runs of each way")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.device == "cpu":
        torch.set_num_threads(1)  # as djinnd runs on the CPU
    lm = load_model("tiny-llama", a.device)
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    bus = EventBus()
    rt = Runtime(lm, bus, lm.weights_bytes + (256 << 20), 64 << 20, tempfile.mkdtemp())

    def bare() -> float:
        with torch.inference_mode():
            return statistics.median(greedy_decode(lm, PROMPT, a.tokens)[1])

    def steps_now(beside_paused: bool) -> float:
        paused = rt.create(token_ids=PROMPT) if beside_paused else None
        if paused:
            rt.run_to(paused.id, [lm.num_layers // 2])
        s = rt.create(token_ids=PROMPT)
        rt.generate(s.id, 1)  # the prefill
        lat = []
        for _ in range(a.tokens):
            sync()
            t0 = time.perf_counter()
            if s.id not in rt.steps_now([s.id]):
                raise SystemExit("steps_now declined a step: raise the budget")
            lat.append(time.perf_counter() - t0)
        for x in (s, paused):
            if x:
                rt.close(x.id)
        return statistics.median(lat)

    ways = {"bare loop": bare, "steps_now": lambda: steps_now(False), "steps_now, hooks on": lambda: steps_now(True)}
    for fn in ways.values():  # warm-up
        fn()
    runs = {w: [] for w in ways}
    for r in range(a.runs):
        for w, fn in (ways.items() if r % 2 else reversed(ways.items())):
            runs[w].append(fn())
    rt.shutdown()
    bus.close()
    print(machine_line())
    print(load_line())
    print(f"tiny-llama on {lm.device}, {a.tokens} decode steps after a {len(PROMPT)}-token prompt, {a.runs} runs of each way")
    base = runs["bare loop"]
    for w, xs in runs.items():
        ratio = statistics.median([b / x for b, x in zip(base, xs)])
        over = statistics.median([x - b for b, x in zip(base, xs)]) * 1e6
        print(f"  {w:20s} {statistics.median(xs) * 1e6:8.1f} us a token   bare/this {ratio:.3f}   (+{over:.1f} us)")


if __name__ == "__main__":
    main()
