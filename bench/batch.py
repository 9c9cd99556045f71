"""Batched decode through djinnd's runtime against transformers' own batched generate, in one process.

B sessions, each with its own prompt and KV slab, decode token by token together: every round is one
`Runtime.steps_now` call over all of them (what the RPC loop does with the steps that came in
together: pins, charges, one batched forward, the tokens). The anchor is `model.generate` of the
same B prompts as one padded batch, greedy, for the same number of tokens, with its prefill timed
apart and taken off. Tokens are compared session by session (a random tiny model has near-ties that
a batch's different matmul shapes can tip either way). Both at each batch size, alternating, medians of the runs; the ratio is paired
run by run (djinnd tokens/s over generate's).

    python bench/batch.py [--model tiny-llama] [--batches 1,4,16,64] [--tokens 32] [--runs 5] [--device cpu]
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
from djinnd.scheduler import DeviceLock  # noqa: E402
from djinnd.telemetry import EventBus  # noqa: E402

PROMPT_LEN = 16


def prompts(b: int, vocab: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % (vocab - 3) + 3 for j in range(PROMPT_LEN)] for i in range(b)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per run")
    ap.add_argument("--runs", type=int, default=5, help="runs of each way at each batch size")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.device == "cpu":
        torch.set_num_threads(1)  # as djinnd runs on the CPU
    sizes = [int(x) for x in a.batches.split(",")]
    lm = load_model(a.model, a.device)
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    bus = EventBus()
    rt = Runtime(lm, bus, lm.weights_bytes + (4 << 30), 64 << 20, tempfile.mkdtemp(),
                 device_lock=DeviceLock(max_batch=max(sizes)))
    same = []

    def djinnd(b: int) -> float:
        ss = [rt.create(token_ids=p) for p in prompts(b, lm.vocab_size)]
        for s in ss:
            rt.generate(s.id, 1)  # the prefills, untimed
        ids = [s.id for s in ss]
        sync()
        t0 = time.perf_counter()
        for _ in range(a.tokens):
            if len(rt.steps_now(ids)) != b:
                raise SystemExit("steps_now declined a step: raise the budget")
        sync()
        dt = time.perf_counter() - t0
        same.append([s.generated for s in ss])
        for s in ss:
            rt.close(s.id)
        return b * a.tokens / dt

    def generate(b: int) -> float:
        ids = torch.tensor(prompts(b, lm.vocab_size), device=lm.device)
        mask = torch.ones_like(ids)

        def timed(n: int):
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, pad_token_id=0)
            sync()
            return time.perf_counter() - t0, out[:, PROMPT_LEN:].tolist()

        prefill, _ = timed(1)  # the prefill and its first token, taken off
        dt, toks = timed(1 + a.tokens)
        same.append(toks)
        return b * a.tokens / max(dt - prefill, 1e-9)

    print(machine_line())
    print(load_line())
    print(f"{a.model} on {lm.device} ({str(lm.dtype).removeprefix('torch.')}), {a.tokens} decode steps after "
          f"{PROMPT_LEN}-token prompts, {a.runs} runs of each way")
    for b in sizes:
        djinnd(b), generate(b)  # warm-up
        same.clear()
        ours, theirs = [], []
        for r in range(a.runs):
            for way in ((djinnd, generate) if r % 2 else (generate, djinnd)):
                (ours if way is djinnd else theirs).append(way(b))
        ratio = statistics.median([x / y for x, y in zip(ours, theirs)])
        agree = sum(x == y for x, y in zip(same[0], same[1]))  # sessions whose tokens match in the first runs
        print(f"  batch {b:3d}: djinnd {statistics.median(ours):9.1f} tok/s   generate {statistics.median(theirs):9.1f} tok/s"
              f"   djinnd/generate {ratio:.3f}   tokens equal in {agree}/{b} sessions")
    rt.shutdown()
    bus.close()


if __name__ == "__main__":
    main()
