"""The least a token-by-token client can pay a token: one greedy decode step per request, served
from another process four ways, and by djinnd, each against the same loop in this process.

A step behind a socket costs more than one in a loop: the round trip, and a processor gone cold
while it waited. The same step (tiny-llama, one torch thread, inference_mode, as djinnd runs on the
CPU) is served one request a token by
  zmq, both block    a REP server and a REQ client that sleep in recv (the decode scenario's floor)
  zmq, server spins  the server polls without sleeping, as djinnd's busy-poll does
  zmq, both spin     the client polls too
  shm, both spin     a shared-memory mailbox, no system call at all: the limit of any transport
  djinnd per call    Client.generate(sid, 1) to a private djinnd
Runs of each way alternate with in-process runs, one server at a time (two spinning ones would take
both cores); the ratio is paired run by run, and every way's tokens are checked against in-process.

    python bench/transport.py [--tokens 64] [--runs 8]
"""

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import zmq  # noqa: E402

from bench.common import load_line, machine_line  # noqa: E402
from djinnd import PrivateDaemon  # noqa: E402
from djinnd.client import Client  # noqa: E402

PROMPT = list(range(5, 37))


class Steps:
    """Greedy steps of one sequence: `start` runs the prompt, `step` the next token."""

    def __init__(self):
        from djinnd.models import load_model
        torch.set_num_threads(1)
        self.lm = load_model("tiny-llama", "cpu")

    def start(self) -> int:
        from transformers import DynamicCache
        self.cache = DynamicCache(config=self.lm.model.config)
        return self._run(PROMPT)

    def step(self) -> int:
        return self._run([self.token])

    def _run(self, ids) -> int:
        with torch.inference_mode():
            self.token = int(self.lm.forward(torch.tensor([ids]), self.cache).argmax())
        return self.token


def _recv(sock, spin: bool) -> bytes:
    while spin:
        try:
            return sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass
    return sock.recv()


def zmq_server(endpoint: str, spin: bool, ready) -> None:
    steps = Steps()
    sock = zmq.Context().socket(zmq.REP)
    sock.bind(endpoint)
    ready.set()
    while True:
        start = _recv(sock, spin) == b"start"
        sock.send(b"%d" % (steps.start() if start else steps.step()))


def shm_server(name: str, ready) -> None:
    """Mailbox of four int64: request number, start?, number answered, token."""
    steps = Steps()
    shm = SharedMemory(name)
    box, seen = shm.buf.cast("q"), 0
    ready.set()
    while True:
        while box[0] == seen:
            pass
        seen = box[0]
        box[3] = steps.start() if box[1] else steps.step()
        box[2] = seen  # written last: the token is in place when the client sees it


class Served:
    """One way of serving steps from another process: `call(start)` returns the token."""

    def __init__(self, way: str, folder: str):
        ctx = mp.get_context("forkserver")  # the servers fork from one process that imported torch once
        ctx.set_forkserver_preload(["torch", "djinnd.models", "bench.transport"])
        self.proc = self.sock = self.shm = self.daemon = None
        if way == "djinnd per call":
            self.daemon = PrivateDaemon("--device", "cpu").start()
            self.client, self.sid = Client(self.daemon.socket), None
            self.call = self._djinnd
            return
        ready = ctx.Event()
        if way.startswith("zmq"):
            endpoint = f"ipc://{folder}/{way.replace(' ', '').replace(',', '-')}.sock"
            spin_server, self.spin = way != "zmq, both block", way == "zmq, both spin"
            self.proc = ctx.Process(target=zmq_server, args=(endpoint, spin_server, ready), daemon=True)
            self.sock = zmq.Context.instance().socket(zmq.REQ)
            self.sock.connect(endpoint)
            self.call = self._zmq
        else:
            self.shm = SharedMemory(create=True, size=32)
            self.box, self.n = self.shm.buf.cast("q"), 0
            self.box[0] = self.box[2] = 0
            self.proc = ctx.Process(target=shm_server, args=(self.shm.name, ready), daemon=True)
            self.call = self._shm
        self.proc.start()
        if not ready.wait(120):
            raise SystemExit(f"{way}: the server did not start")

    def _zmq(self, start: bool) -> int:
        self.sock.send(b"start" if start else b"step")
        return int(_recv(self.sock, self.spin))

    def _shm(self, start: bool) -> int:
        self.n += 1
        self.box[1] = int(start)
        self.box[0] = self.n
        while self.box[2] != self.n:
            pass
        return self.box[3]

    def _djinnd(self, start: bool) -> int:
        if start:
            if self.sid is not None:
                self.client.close(self.sid)
            self.sid = self.client.create_session(token_ids=PROMPT)
        return self.client.generate(self.sid, 1)[0]

    def close(self) -> None:
        if self.daemon:
            self.client.close_socket()
            self.daemon.remove()
        if self.proc:
            self.proc.kill()
            self.proc.join()
        if self.sock:
            self.sock.close(0)
        if self.shm:
            self.box.release()
            self.shm.close()
            self.shm.unlink()


def timed(call, tokens: int) -> tuple[list[int], float]:
    """The prompt's token and `tokens` more, with the median seconds of a step (the prompt untimed)."""
    toks, lat = [call(True)], []
    for _ in range(tokens):
        t0 = time.perf_counter()
        toks.append(call(False))
        lat.append(time.perf_counter() - t0)
    return toks, statistics.median(lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per run")
    ap.add_argument("--runs", type=int, default=8, help="runs of each way")
    a = ap.parse_args()
    local = Steps()
    here = lambda start: local.start() if start else local.step()  # noqa: E731
    reference = timed(here, a.tokens)[0]
    ways = ["zmq, both block", "zmq, server spins", "zmq, both spin", "shm, both spin", "djinnd per call"]
    rows, base = [], []
    with tempfile.TemporaryDirectory(prefix="djt", dir="/tmp") as folder:
        for way in ways:
            served = Served(way, folder)
            try:
                timed(served.call, 4)  # warm-up
                pairs, same = [], True
                for _ in range(a.runs):
                    _, b = timed(here, a.tokens)
                    toks, t = timed(served.call, a.tokens)
                    pairs.append((b, t))
                    same &= toks == reference
            finally:
                served.close()
            base += [b for b, _ in pairs]
            rows.append((way, statistics.median(t for _, t in pairs), statistics.median(b / t for b, t in pairs), same))
    print(machine_line())
    print(load_line())
    print(f"tiny-llama on the CPU, one torch thread, inference_mode; {a.tokens} tokens after a "
          f"{len(PROMPT)}-token prompt, {a.runs} runs of each way")
    print(f"  {'in-process loop':20s} {statistics.median(base) * 1e6:8.1f} us a token")
    for way, t, ratio, same in rows:
        print(f"  {way:20s} {t * 1e6:8.1f} us a token   in-process/this {ratio:.3f}   "
              f"tokens {'equal' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
