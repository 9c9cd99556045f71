"""The runtime: one shared model, many sessions, breakpoints inside the forward pass, and the budget.

Plain Python with no knowledge of sockets: the RPC server is a thin adapter over these methods,
and tests drive them directly. A forward with breakpoints runs in its own thread; while one is open
(or a prefill), a hook on every decoder layer looks up whose forward is running (a ContextVar) and
pauses it there when that session asked to.
While paused the thread gives up the device, so other sessions compute and the paused one can be
swapped out; resume swaps it back before the thread runs on from the next layer.
Decode steps of different sessions that wait for the device at the same moment run as one batched
forward (DeviceLock.join picks the rows, rows.py runs them), each session's KV staying in its slab.
"""

import contextlib
import contextvars
import itertools
import logging
import threading
import time
from functools import partial

import torch

from . import devicecosts, heap, moves
from .charges import capacity_for
from .memory import ROOM_WAIT_S, MemoryManager, RoomHeld
from .prefetch import Prefetcher
from .protocol import DjinnError
from .scheduler import QOS_RANK, DeviceLock
from .session import Aborted, Session, State

log = logging.getLogger("djinnd")
_running: contextvars.ContextVar = contextvars.ContextVar("djinn_session", default=None)
MAX_VALUES = 1 << 16  # elements an inspect may return
PREFILL_CHUNK = 512  # tokens a prefill segment feeds at most


def _built(s: Session, n: int) -> None:
    """A forward of `n` tokens went into its KV: its history, for the journal (run-length coded; a
    patched forward is one entry with its patches, [n, 1, patches], to be redone with them)."""
    seg, patches = s.segments, s.redo or (s.patches if s.breakpoints else [])
    if patches:
        seg.append([n, 1, list(patches)])
    elif seg and seg[-1][0] == n and len(seg[-1]) == 2:
        seg[-1] = [n, seg[-1][1] + 1]
    else:
        seg.append([n, 1])


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's values as bytes in C order, read on the host (a device temporary would not be charged)."""
    return t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _as_djinn_error(s: Session, err: Exception) -> DjinnError:
    return err if isinstance(err, DjinnError) else DjinnError("internal", f"forward of session {s.id} failed: {err!r}")


class Runtime:
    def __init__(self, lm, bus, budget: int, host_pool: int, spill_dir, capacity: int = 0,
                 device_lock: DeviceLock | None = None, costs: devicecosts.DeviceCosts | None = None,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.lm, self.bus = lm, bus
        self.costs = costs or devicecosts.measure(lm)  # CUDA: temporaries and workspaces, charged too
        overhead = self.costs.thread_bytes * self.costs.handles
        if budget <= lm.weights_bytes + overhead:
            raise ValueError(f"the budget ({budget} B) does not even hold the weights ({lm.weights_bytes} B)"
                             + (f" and cuBLAS workspaces ({overhead} B)" if overhead else ""))
        self.mem = MemoryManager(lm.device, budget, lm.weights_bytes, host_pool, spill_dir, bus, capacity, overhead)
        self.mem.on_disk = self._spilled
        self._compute_threads = {self.costs.owner} - {None}  # alive ones hold a workspace each
        self._workspaces = self.costs.handles
        self.device_lock = device_lock or DeviceLock()
        if lm.batch_error:  # its decode steps run one at a time, whatever is asked
            self.device_lock.configure(max_batch=1)
        self.prefill_chunk = prefill_chunk
        self.sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._hooks: list = []  # on the model only while a forward that needs them is open (_use_hooks)
        self._hook_users = 0
        self.prefetch = Prefetcher(self.mem, bus)  # phase hints: early swap-out, prefetch before wake-up
        self.prefetch.start()
        self.journal = None  # a journal.Journal: each request's outcome is written there (restore)
        self.stopping = False  # the daemon stops: a generate in flight ends at its next token
        self._importing = threading.Lock()  # session.import, one at a time: a file makes one session

    # -- sessions ------------------------------------------------------------------------------
    def create(self, prompt: str | None = None, token_ids=None, qos: str = "interactive") -> Session:
        if token_ids is None:
            if not prompt:
                raise DjinnError("bad_params", "give a non-empty 'prompt' or 'token_ids'")
            token_ids = self.lm.encode(prompt)
        self._check_ids(token_ids)
        self._check_context(len(token_ids), "a session of")
        first = capacity_for(0, len(token_ids)) * self.lm.kv_bytes_per_token + self._act_bytes(len(token_ids))
        if self.mem.fixed + first > self.mem.budget:
            raise DjinnError("out_of_budget", f"a session of {len(token_ids)} tokens needs {first} B of KV; "
                             f"the budget leaves {self.mem.budget - self.mem.fixed} B beside the weights")
        with self._lock:
            s = Session(next(self._ids), token_ids, qos, self.lm)
            self.sessions[s.id] = s
        self.mem.register(s)
        self._event(s, "created")
        self._record(s)
        return s

    def get(self, sid) -> Session:
        s = self.sessions.get(sid)
        if s is None:
            raise DjinnError("unknown_session", f"no session {sid!r}")
        return s

    def list_sessions(self) -> list[dict]:
        return [s.info() for s in list(self.sessions.values())]

    def close(self, sid) -> None:
        s = self.get(sid)
        with s.cond:
            if s.closing:
                raise DjinnError("unknown_session", f"session {s.id} is closing")
            s.closing = True  # no forward starts from now on; one running stops at its next layer
        with s.op_lock:  # its caller, who holds it, has its answer first
            with s.cond:
                s.cond.wait_for(lambda: s.state != State.RUNNING, 120)
                s.abort_requested = True
                s.cond.notify_all()
            if s.thread is not None:
                s.thread.join(30)
        with self._lock:
            self.sessions.pop(s.id, None)
        journal = self.journal
        if journal is not None:
            journal.delete(s.id)
        self.mem.unregister(s)
        s.cache.release()
        s.held, s.hidden, s.embeds = [], None, None
        s.state = State.CLOSED
        self._event(s, "closed")
        if not self.sessions:  # the last one: the C heap's free pages go back to the OS (heap.py)
            heap.trim()

    def close_all(self) -> None:
        for sid in list(self.sessions):
            try:
                self.close(sid)
            except DjinnError:
                pass

    def shutdown(self) -> None:
        """Close every session (kept in the journal, if any), stop the prefetcher and take the hooks off
        the (possibly shared) model."""
        journal = self.detach_journal()
        if journal is not None:
            journal.close()
        self.close_all()
        self.prefetch.stop()
        with self._lock:
            self._hook_users = 0
            self._remove_hooks()

    # -- journal and restore -----------------------------------------------------------------------
    def _record(self, *sessions: Session) -> None:
        """Journal what a request left the sessions in, from the thread that finished it."""
        journal = self.journal
        if journal is not None:
            journal.save(sessions)

    def _spilled(self, s: Session, stored) -> None:
        """A disk file holds `s`'s slab alone (an idle session's KV): journaled, so that a start after
        a stop or a kill takes it back rather than compute it again (_restore)."""
        journal = self.journal
        if journal is not None and stored.sizes == [s.cache.nbytes]:
            journal.spilled(s.id, {"file": stored.path.name, "bytes": stored.nbytes, "crc32": stored.crc,
                                   "seq_len": s.cache.seq_len})

    def keep_swap_files(self) -> None:
        """At a stop, once the journal is detached: idle sessions' swap files stay for the next start."""
        self.mem.keep_on_disk([s for s in list(self.sessions.values()) if s.state == State.IDLE])

    def detach_journal(self):
        """Stop journaling (and give the journal back): what follows, such as closing every session
        at a stop, is not to be restored differently."""
        journal, self.journal = self.journal, None
        return journal

    def restore(self, journal) -> list[Session]:
        """Bring back the sessions `journal` read, under their ids, then journal into it from now on.

        An idle one whose KV a previous run left in a disk-tier file, whole and with its checksum,
        comes back swapped out to that file; any other comes back with an empty KV, which its next
        forward first computes again from its tokens (one prefill). A paused one is paused again
        here, at its layer: the forwards that built its KV run again as they ran (same sizes, same
        order), then its paused forward with the same breakpoints, each journaled patch applied at
        its layer as the forward passes it. On the CPU its hidden state is then the one it had bit
        for bit, unless a decode step that built its KV was batched with other sessions' (the rows'
        kernels differ from one session's in the last bits).
        """
        restored = []
        for r in journal.records:
            try:
                restored.append(self._restore(r))
            except Exception as e:  # noqa: BLE001 - a record that does not hold together: that one only
                log.error("session %s of journal %s not restored: %s", r.id, journal.path, e)
                journal.delete(r.id)
        with self._lock:
            self._ids = itertools.count(max(journal.last_id, *self.sessions, 0) + 1)
        self.journal = journal
        self._record(*restored)  # (into a fresh file, when the old one was moved aside)
        return restored

    def _restore(self, r) -> Session:
        self._check_ids(r.prompt)
        if r.generated:
            self._check_ids(r.generated)
        if r.qos not in QOS_RANK:
            raise ValueError(f"unknown QoS {r.qos!r}")
        if r.state == State.PAUSED and r.layer not in r.breakpoints:
            raise ValueError(f"it is paused at layer {r.layer}, not one of its breakpoints {r.breakpoints}")
        tokens = r.prompt + r.generated
        kv = len(tokens) - r.pending
        s = Session(r.id, r.prompt, r.qos, self.lm)
        s.created_at, s.generated, s.pending = r.created_at, list(r.generated), tokens[kv:]
        with self._lock:
            if s.id in self.sessions:
                raise ValueError("its id is taken")
            self.sessions[s.id] = s
        self.mem.register(s)
        built = sum(x[0] * x[1] for x in r.segments)
        history = [list(x) for x in r.segments] if built == kv else [[kv, 1]] if kv else []  # the forwards of its KV
        if r.state == State.PAUSED:
            s.replay = history
            try:
                self._pause_again(s, r)
            except Exception as e:  # noqa: BLE001 - it stays as the failure left it: idle, or paused elsewhere
                log.error("session %s, paused at layer %s before the restart, is %s at %s: %s",
                          s.id, r.layer, s.state, s.layer, e)
        elif kv and self._take_back(s, r.spill, kv):
            s.segments = history
        elif any(len(x) > 2 for x in history):  # its KV holds patches: its forwards run again as they ran
            s.replay = history
        else:  # one prefill
            s.replay = [[kv, 1]] if kv else []
        s.phase = r.phase  # (after the forward run again, which would have made it COMPUTE)
        s.restored = True
        self._event(s, "restored")
        return s

    def _take_back(self, s: Session, spill: dict | None, kv: int) -> bool:
        """Whether `s` (idle, restored) now holds the `kv` tokens' KV that `spill`, its journaled swap
        file, holds: swapped out to it, its slab of the file's capacity and no memory."""
        if not spill or spill.get("seq_len") != kv:  # a file of an earlier KV: its forwards came since
            return False
        capacity, rest = divmod(spill["bytes"], s.cache.bytes_per_token)
        if rest or capacity < kv:
            return False
        s.cache.shell(capacity, kv)
        if self.mem.adopt(s, spill["file"], spill["bytes"], spill["crc32"]):
            return True
        s.cache.release()
        for layer in s.cache.layers:
            layer.reset()
        return False

    def _pause_again(self, s: Session, r) -> None:
        """Run `s`'s paused forward again up to layer `r.layer`, redoing its patches where they were made."""
        out = self.run_to(s.id, r.breakpoints)
        while out["state"] == "paused":
            for p in r.patches:
                if p["layer"] == out["layer"]:
                    self.patch(s.id, p["op"], p["value"], p.get("positions"), p.get("channels"))
            if out["layer"] == r.layer:
                return
            out = self.resume(s.id)
        raise DjinnError("internal", "its forward ended before that layer")

    def _replay(self, s: Session) -> None:
        """A restored session's KV computed again before its next forward: the forwards in `s.replay`,
        on its tokens before the pending ones (its tokens and pending input are left as they were)."""
        pending, tokens = s.pending, s.prompt_ids + s.generated
        with s.cond:  # its input is the replay's meanwhile: not to be journaled
            s.state = State.RUNNING
        try:
            while s.replay:
                (size, times, *patches), pos = s.replay[0], s.cache.seq_len
                s.pending, s.redo = tokens[pos:pos + size], patches[0] if patches else []
                try:
                    while self._segment(s, keep=False) is None:
                        pass
                except Aborted:
                    raise DjinnError("unknown_session", f"session {s.id} is closing") from None
                except BaseException:  # a chunked segment may have left some chunks: all go again
                    for layer in s.cache.layers:
                        layer.length = pos
                    raise
                s.replay = ([[size, times - 1]] if times > 1 else []) + s.replay[1:]
        except Exception as e:
            raise _as_djinn_error(s, e) from None
        finally:
            s.redo = []
            with s.cond:
                s.pending, s.token, s.state = pending, None, State.IDLE

    # -- moving sessions between daemons (moves.py) ------------------------------------------------
    def export_session(self, sid, folder) -> dict:
        """Write idle session `sid`'s tokens and KV into a file in `folder`, for another daemon's
        import; the session keeps what it holds. Its KV is read on the device, so a swapped-out one is
        brought in first, and a restored one computes its KV first, as its next forward would."""
        s = self.get(sid)
        self._take_op(s)  # no forward, append or close comes between the check and the copy
        try:
            with s.cond:
                self._check_idle(s)
            if self.mem.moving(s):
                raise DjinnError("bad_state", f"session {s.id} is being swapped; export it once it has moved")
            if s.replay:
                self._replay(s)
            self.mem.pin(s)
            try:
                self.mem.swap_in(s, reason="export")
                cache, n = s.cache, s.cache.seq_len
                chunks = [_raw(cache.slab[i, ..., :n, :]) for i in range(cache.num_layers)] if n else []
                header = {"model": self.lm.name, "prompt": list(s.prompt_ids), "generated": list(s.generated),
                          "pending": list(s.pending), "qos": s.qos, "phase": s.phase,
                          "segments": s.segments + s.replay, "kv": moves.layout(cache)}
            finally:
                self.mem.unpin(s)
        finally:
            s.op_lock.release()
        return moves.write(folder, s.id, header, chunks)

    def import_session(self, folder, name: str, qos: str | None = None) -> Session:
        """A new session from the file `name` in `folder` (session.export's, from any daemon of this
        model): the exporter's tokens and KV bytes, so its next tokens are the exporter's. Charged and
        journaled as any new session; the file is removed once the session holds it."""
        with self._importing:
            header, kv, path = moves.read(folder, name, self.lm)
            s = self._imported(header, kv, qos or header["qos"])
            try:
                path.unlink()
            except OSError as e:
                log.warning("session %s imported from %s, which could not be removed: %s", s.id, path, e)
        return s

    def _imported(self, h: dict, kv: bytearray, qos: str) -> Session:
        """The session a checked header and its KV bytes make, in a slab of the exporter's capacity."""
        n, cap = h["kv"]["seq_len"], h["kv"]["capacity"]
        need = cap * self.lm.kv_bytes_per_token
        if self.mem.fixed + need > self.mem.budget:
            raise DjinnError("out_of_budget", f"the imported session's KV needs {need} B; the budget leaves "
                             f"{self.mem.budget - self.mem.fixed} B beside the weights")
        with self._lock:
            s = Session(next(self._ids), h["prompt"], qos, self.lm)
        s.generated, s.pending, s.segments, s.phase = h["generated"], h["pending"], h["segments"], h["phase"]
        self.mem.register(s)
        self.mem.pin(s)  # no victim while its slab is filled
        try:
            if cap:
                self.mem.reserve(s, s.cache.bytes_for(cap))
                s.cache.grow(cap)
            if n:
                src = torch.frombuffer(kv, dtype=torch.uint8).view(s.cache.dtype).view(h["kv"]["shape"])
                s.cache.slab[..., :n, :].copy_(src)
                for layer in s.cache.layers:
                    layer.length = n
        except BaseException:
            self.mem.unregister(s)
            s.cache.release()
            raise
        with self._lock:
            self.sessions[s.id] = s
        self.mem.unpin(s)
        self._event(s, "created")
        self._record(s)
        return s

    # -- forward passes ---------------------------------------------------------------------------
    def generate(self, sid, max_new_tokens: int) -> list[int]:
        """Greedy tokens, one forward each; no other request's forward or append comes between them
        (it is refused as busy), so a generate's tokens are contiguous in the session."""
        s = self.get(sid)
        tokens = []
        self._take_op(s)
        try:
            for _ in range(max_new_tokens):
                if self.stopping:  # rather than hold the stop up: what it made is kept (and journaled)
                    raise DjinnError("stopping", f"djinnd is stopping: session {s.id} generated {len(tokens)} of "
                                     f"{max_new_tokens} tokens, which it keeps")
                tokens.append(self._forward_held(s, [])["token"])
            return tokens
        finally:
            s.op_lock.release()
            self._record(s)

    def append(self, sid, token_ids) -> dict:
        """Input for the next forward after what `sid` holds, so a conversation's new turn computes only
        its own tokens over the KV kept from the turns before (they follow its last token, which the
        next forward feeds too). Its tokens after the prompt list them in order with the generated ones."""
        s = self.get(sid)
        self._check_ids(token_ids)
        self._take_op(s)
        try:
            with s.cond:
                self._check_idle(s)
                self._check_context(s.cache.seq_len + len(s.pending) + len(token_ids), f"session {s.id} would hold")
                s.pending = s.pending + list(token_ids)
                s.generated += token_ids
        finally:
            s.op_lock.release()
        self._record(s)
        return {"pending": len(s.pending)}

    def steps_now(self, sids) -> dict:
        """Decode steps that can start at once, run on the caller's thread as one batched forward:
        sessions idle and resident, the device free and nobody waiting for it, the budget with room
        for the activations (and a full slab's growth) without swapping anyone out. {session id:
        its token, or the DjinnError its step met}; a session left out is unchanged.

        The RPC loop answers token-by-token decoding this way: the steps that came in together
        share a forward, and two thread hand-offs are most of what a call costs over a small
        model's token.
        """
        cands = []
        for sid in dict.fromkeys(sids):
            s = self.sessions.get(sid) if isinstance(sid, int) else None
            if s is not None and self._steppable(s):
                cands.append(s)
        cands = sorted(cands, key=lambda s: QOS_RANK.get(s.qos, 1))[:self.device_lock.max_batch]
        if not cands or not self._take_thread(make_room=False):
            return {}
        if not self.device_lock.acquire(cands[0].qos, wait=False):
            return {}
        act, rows = self._row_bytes(len(cands)), []
        for s in cands:
            if not s.op_lock.acquire(blocking=False):
                continue
            with s.cond:  # another request's forward may have come first
                if self._steppable(s) and self._pin_now(s, act):
                    s.state, s.breakpoints, s.error, s.token = State.RUNNING, [], None, None
                    s.forward_pinned, s.act_charge = True, act
                    rows.append(s)
                    continue
            s.op_lock.release()
        if not rows:
            self.device_lock.release()
            return {}
        try:
            self._run_batch(rows)
            out = {}
            for s in rows:
                err, s.error = s.error, None
                out[s.id] = _as_djinn_error(s, err) if err is not None else s.token
            return out
        finally:
            for s in rows:
                s.op_lock.release()
            self._record(*rows)

    def _steppable(self, s: Session) -> bool:
        """Idle, with one token to decode, and room for it in the model's context."""
        return (s.state == State.IDLE and not s.closing and len(s.pending) == 1 and not s.replay
                and self._fits_context(s))

    def _fits_context(self, s: Session) -> bool:
        """The next forward's tokens fit in the model's context (its positions past it do not exist)."""
        n = self.lm.context_length
        return n is None or s.cache.seq_len + len(s.pending) <= n

    def _check_context(self, tokens: int, what: str) -> None:
        n = self.lm.context_length
        if n is not None and tokens > n:
            raise DjinnError("bad_params", f"{what} {tokens} tokens: past the model's context of {n}")

    def _pin_now(self, s: Session, act: int) -> bool:
        """Pin `s` on the device for a decode step, charged `act` bytes of activations and its slab
        grown if full, if it is resident and all that fits without swapping anyone out; else False
        with nothing changed."""
        cache = s.cache
        cap = cache.capacity_for(cache.seq_len + 1)
        new = cache.bytes_for(cap) if cap > cache.capacity else 0
        if not self.mem.pin_resident(s, act + new):
            return False
        if new:
            old = cache.nbytes
            try:
                cache.grow(cap)
            except Exception:  # noqa: BLE001 - no memory for it: declined, as if it did not fit
                self.mem.unpin(s, release=act + new)
                return False
            self.mem.release(s, old)
        return True

    def run_to(self, sid, layers) -> dict:
        """Start the next forward with breakpoints after the given decoder layers; return at the first."""
        n = self.lm.num_layers
        bad = [x for x in layers if not 0 <= x < n]
        if bad:
            raise DjinnError("bad_params", f"layer {bad[0]} is out of range: the model has {n} decoder layers (0..{n - 1})")
        s = self.get(sid)
        try:
            return self._run_forward(s, sorted(set(layers)))
        finally:
            self._record(s)

    def resume(self, sid) -> dict:
        s = self.get(sid)
        with s.op_lock:  # inspect, patch and close wait until it has paused again or finished
            with s.cond:
                if s.state != State.PAUSED or s.closing:
                    raise DjinnError("bad_state", f"session {s.id} is {s.state}, not paused at a breakpoint")
                s.error = None
                s.resume_requested = True
                s.restored = False
                s.cond.notify_all()
            try:
                return self._wait(s, resumed=True)
            finally:
                self._record(s)

    def _run_forward(self, s: Session, breakpoints: list[int]) -> dict:
        # held until the forward pauses or ends: no other request's forward or resume comes between
        # it and the answer read back from the session
        self._take_op(s)
        try:
            return self._forward_held(s, breakpoints)
        finally:
            s.op_lock.release()

    def _forward_held(self, s: Session, breakpoints: list[int]) -> dict:
        """The next forward of `s`, whose op_lock the caller holds: its answer once paused or ended."""
        if s.replay:
            self._check_idle(s)
            self._replay(s)
        with s.cond:
            self._check_idle(s)
            if not self._fits_context(s):
                raise DjinnError("bad_state", f"session {s.id} holds {s.cache.seq_len} tokens: the model's "
                                 f"context of {self.lm.context_length} is full")
            s.state, s.breakpoints, s.error, s.token = State.RUNNING, breakpoints, None, None
            s.patches, s.restored = [], False
            if breakpoints:  # it may pause: a thread of its own, which waits there for resume
                s.thread = threading.Thread(target=self._forward, args=(s,), name=f"session-{s.id}", daemon=True)
                s.thread.start()
        if breakpoints:
            return self._wait(s)
        if len(s.pending) == 1:  # a decode step: it may share a forward with other sessions' steps
            waking, s.waking = s.waking, False
            rows = self.device_lock.join(s, s.qos, waking)
            if rows is not None:
                self._run_batch(rows)
            return self._wait(s)
        return {"state": "idle", "token": self._forward(s)}  # a prefill, here: no thread hand-off

    def _check_ids(self, token_ids) -> None:
        if not token_ids or not all(0 <= t < self.lm.vocab_size for t in token_ids):
            raise DjinnError("bad_params", f"'token_ids' must be a non-empty list of ints in [0, {self.lm.vocab_size})")

    def _take_op(self, s: Session) -> None:
        """`s`'s op_lock for this request, or why not: another request holds it, or `s` is not idle."""
        if not s.op_lock.acquire(blocking=False):
            self._check_idle(s)
            raise DjinnError("bad_state", f"session {s.id} is busy with another request")

    @staticmethod
    def _check_idle(s: Session) -> None:
        if s.closing:
            raise DjinnError("unknown_session", f"session {s.id} is closing")
        if s.state != State.IDLE:
            where = f" at layer {s.layer}; resume it first" if s.state == State.PAUSED else ""
            raise DjinnError("bad_state", f"session {s.id} is {s.state}{where}")

    def _wait(self, s: Session, resumed: bool = False) -> dict:
        with s.cond:
            if resumed:
                s.cond.wait_for(lambda: not s.resume_requested)
            s.cond.wait_for(lambda: s.state != State.RUNNING or s.error is not None)
            if s.error is not None:
                err, s.error = s.error, None
                raise _as_djinn_error(s, err)
            if s.state == State.PAUSED:
                return {"state": "paused", "layer": s.layer}
            return {"state": s.state, "token": s.token}

    def _run_batch(self, rows: list[Session]) -> None:
        """One decode step of every row as one forward, holding a device slot (given back here).
        Each row's outcome is left on its session, as a forward with breakpoints leaves its, for
        `_wait` on the thread that asked for it; a row that cannot enter fails alone.

        The rows must fit on the device together: a row for which the batch's rows already in hold
        the room does not wait for them (they cannot leave before the forward), it runs in the next
        batch, after this one, on this device slot's next turn."""
        act = self._row_bytes(len(rows))
        ready, later = [], []
        for s in rows:
            if later:
                later.append(s)
                continue
            try:
                self.prefetch.computing(s)
                if not s.forward_pinned:  # (steps_now pinned and charged its rows)
                    self._enter(s, 1, act, wait=ROOM_WAIT_S if not ready else 0.0)
                s.touch()
                ready.append(s)
            except RoomHeld as e:  # held by this batch's rows (or another forward's): the next batch
                self._leave(s)
                if ready:
                    later.append(s)
                else:
                    self._end(s, e)
            except Exception as e:  # noqa: BLE001 - that row's error; the others run
                self._leave(s)
                self._end(s, e)
        start = [s.cache.seq_len for s in ready]
        outcome = None
        try:
            if ready:
                with torch.inference_mode():
                    if len(ready) == 1:
                        s = ready[0]
                        logits = self.lm.forward(torch.tensor([s.pending], device=self.lm.device), s.cache.cache)[None]
                    else:
                        logits = self.lm.forward_rows([s.pending[0] for s in ready], [s.cache for s in ready])
                    outcome = logits.argmax(-1).tolist()
                    for s in ready:
                        _built(s, 1)
        except Exception as e:  # noqa: BLE001 - every row gets it; their sessions stay usable
            outcome = e
            for s, n in zip(ready, start):
                for layer in s.cache.layers:
                    layer.length = n
        finally:
            self.device_lock.release([s.qos for s in ready])
        for i, s in enumerate(ready):
            self._leave(s)
            if isinstance(outcome, Exception):
                self._end(s, outcome)
            else:
                token = outcome[i]
                s.generated.append(token)
                s.pending = [token]
                s.token = token
                self._end(s, None)
        if later:
            self.device_lock.acquire(later[0].qos)
            self._run_batch(later)

    def _end(self, s: Session, error: Exception | None) -> None:
        """A forward of `s` is over: idle again, with the error its caller gets, if any."""
        with s.cond:
            s.state, s.layer = State.IDLE, None
            s.touch()
            s.resume_requested = False
            s.error = error
            s.cond.notify_all()

    def _forward(self, s: Session) -> int | None:
        """A forward with breakpoints (in a thread of its own, its outcome left on the session for
        `_wait`) or a prefill (on its caller's thread, which gets the token or the error).

        A prefill without breakpoints runs in chunks of at most `prefill_chunk` tokens, each a forward
        segment of its own: a decode step waits behind one chunk at most, and the activations charged
        are a chunk's. A forward with breakpoints runs whole: a pause shows every token of it.
        """
        inline = not s.breakpoints
        token = None
        try:
            while token is None:
                token = self._segment(s)
            outcome = None
        except Aborted:
            outcome = DjinnError("bad_state", f"session {s.id} was closed")
        except Exception as e:  # noqa: BLE001 - any failure answers the caller; the session stays usable
            outcome = e
        self._end(s, None if inline else outcome)
        if inline:
            if outcome is not None:
                raise _as_djinn_error(s, outcome)
            return token
        if outcome is None:  # a white-box forward's end; plain decode steps stay quiet
            self._event(s, "finished", token=token)
        return None

    def _segment(self, s: Session, keep: bool = True) -> int | None:
        """One forward segment: the first `n` pending tokens through the model; the token when they
        were the last, None when a prefill has chunks to go (and its pending tokens are the rest).
        The token is the session's next one, unless not `keep` (a forward run again: _replay)."""
        whole = s.breakpoints or s.redo  # a pause, or a patch, sees every token of it
        n = len(s.pending) if whole else min(len(s.pending), self.prefill_chunk)
        if s.closing:  # closed between two chunks
            raise Aborted()
        start_len = s.cache.seq_len
        running = _running.set(s)
        s.long_segment = n > 1  # a prefill: it hands the device over between layers when asked
        hooked = False
        try:
            if whole or s.long_segment:  # it may pause, be patched, hand over or be closed between layers
                self._use_hooks()
                hooked = True
            waking, s.waking = s.waking, False
            self.device_lock.acquire(s.qos, short=not s.long_segment, waking=waking)
            self.prefetch.computing(s)
            self._enter(s, n, self._forward_bytes(n, start_len))
            s.touch()
            with torch.inference_mode():  # no autograd bookkeeping per op: a tiny-llama step 12% faster than no_grad
                logits = self.lm.forward(torch.tensor([s.pending[:n]], device=self.lm.device), s.cache.cache)
            _built(s, n)
            if n < len(s.pending):
                s.pending = s.pending[n:]
                return None
            token = int(logits.argmax())
            if keep:
                s.generated.append(token)
                s.pending = [token]
                s.token = token
            return token
        except BaseException:
            for layer in s.cache.layers:
                layer.length = start_len
            raise
        finally:
            s.embeds, s.held, s.hidden = None, [], None
            self._leave(s)
            if self.device_lock.held_by_me():
                self.device_lock.release()
            if hooked:
                self._drop_hooks()
            _running.reset(running)

    def _enter(self, s: Session, new_tokens: int, act: int, wait: float = ROOM_WAIT_S) -> None:
        """Make `s` resident and charge it for a forward's KV growth and `act` bytes of activations,
        before allocating; pinned until the forward ends."""
        self._take_thread()
        cache = s.cache

        def growth() -> tuple[int, int, int]:
            """The capacity the forward needs, and the old and new slab's bytes if it must grow (else 0, 0)."""
            cap = cache.capacity_for(cache.seq_len + new_tokens)
            return (cap, cache.nbytes, cache.bytes_for(cap)) if cap > cache.capacity else (cap, 0, 0)

        def need() -> int:  # the most its charge grows by: its swap-in, the new slab beside the old, then act
            _, old, new = growth()
            return (s.stored.charge if s.stored is not None else 0) + max(new, new - old + act)

        def take():
            self.mem.swap_in(s, reason="demand", timeout=0)
            cap, old, new = growth()
            if new:
                self.mem.reserve(s, new, timeout=0)
                try:
                    cache.grow(cap)
                except BaseException:
                    self.mem.release(s, new)
                    raise
                self.mem.release(s, old)
            self.mem.reserve(s, act, timeout=0)
            s.act_charge = act
        self._pin_and(s, need, take, wait)

    def _pin_and(self, s: Session, need, take, wait: float = ROOM_WAIT_S) -> None:
        """Pin `s` for a forward and `take()` what it needs on the device (its swap-in, its charges:
        `need()` bytes more at most), each failing at once where sessions running now hold the room.
        While they do, `s` holds nothing, neither its pin nor the device slot its caller holds, and
        moves nobody: it waits for memory to change and the slot to come back, then tries again, for
        up to `wait` seconds. Who holds room may be waiting for the device (a prefill that handed it
        over between layers), or for room this one holds: waiting while holding either, the two wait
        on each other until one fails."""
        deadline = time.monotonic() + wait
        while True:
            seen = self.mem.version
            try:
                self.mem.check_room(s, need())
                self._pin_forward(s)
                try:
                    return take()
                except RoomHeld:
                    self._unpin_forward(s)
                    raise
            except RoomHeld:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                slot = self.device_lock.held_by_me()
                if slot:
                    self.device_lock.release()
                self.mem.wait_changed(seen, left)
                if slot:
                    self.device_lock.acquire(s.qos)

    def _leave(self, s: Session) -> None:
        """Give back what `_enter` took for a forward: its activations' charge and its pin."""
        self.mem.release(s, s.act_charge)
        s.act_charge = 0
        if s.forward_pinned:
            self._unpin_forward(s)

    def _row_bytes(self, rows: int) -> int:
        """Each row's part of a batched decode step's activations (on CUDA its temporaries)."""
        return -(-self._forward_bytes(rows) // rows)

    def _act_bytes(self, tokens: int, past: int = 0) -> int:
        """What a forward over `tokens` new tokens after `past` holds at a pause: embeddings, layer input,
        layer output, and what the load's probe found beside them (rotary tables, ids, masks)."""
        return self.lm.held_bytes(tokens, past)

    def _forward_bytes(self, tokens: int, past: int = 0) -> int:
        """What it holds beside its KV while it computes: on CUDA also the temporaries measured at load."""
        return max(self._act_bytes(tokens, past), self.costs.work_bytes(tokens))

    def _take_thread(self, make_room: bool = True) -> bool:
        """Charge a cuBLAS workspace when this thread's forward makes more compute threads alive at once
        than torch holds workspaces for (it keeps them after a thread ends, for the next). False when
        one is needed, does not fit and `make_room` is off."""
        if not self.costs.thread_bytes:
            return True
        me = threading.current_thread()
        with self._lock:
            if me in self._compute_threads:
                return True
            live = {t for t in self._compute_threads if t.is_alive()}
            if len(live) < self._workspaces:
                self._compute_threads = live | {me}
                return True
        try:
            self.mem.reserve(None, self.costs.thread_bytes, make_room=make_room)
        except DjinnError:
            if not make_room:
                return False
            raise
        with self._lock:
            self._workspaces += 1
            self._compute_threads.add(me)
        return True

    def _pin_forward(self, s: Session) -> None:
        self.mem.pin(s)
        s.forward_pinned = True

    def _unpin_forward(self, s: Session) -> None:
        s.forward_pinned = False
        self.mem.unpin(s)

    # -- breakpoints -----------------------------------------------------------------------------
    def _use_hooks(self) -> None:
        """Put the hooks on the model for a forward that needs them. Hooked modules take torch's
        slow call path (~8 us a module, 4% of a tiny-llama step on the CPU), so a plain decode step runs
        without them while no such forward is open; one that starts with them on just passes them."""
        with self._lock:
            if not self._hook_users:
                hooks = []
                try:
                    for i, layer in enumerate(self.lm.decoder_layers()):
                        hooks.append(layer.register_forward_hook(partial(self._layer_hook, i), with_kwargs=True))
                    hooks.append(self.lm.embed().register_forward_hook(self._embed_hook))
                except BaseException:  # none or all of them
                    for h in hooks:
                        h.remove()
                    raise
                self._hooks = hooks
            self._hook_users += 1

    def _drop_hooks(self) -> None:
        with self._lock:
            self._hook_users -= 1
            if not self._hook_users:
                self._remove_hooks()

    def _remove_hooks(self) -> None:  # holding _lock
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _embed_hook(self, module, args, output):
        s = _running.get()
        if s is not None:
            s.embeds = output

    def _layer_hook(self, index, module, args, kwargs, output):
        s = _running.get()
        if s is None:
            return None
        if s.closing:  # closed mid-forward: stop here, not after a long prefill's last layer
            raise Aborted()
        hidden = output[0] if isinstance(output, tuple) else output
        for p in s.redo:  # a patched forward run again: each patch where it was made
            if p["layer"] == index:
                self._apply(hidden, p["op"], p["value"], p.get("positions"), p.get("channels"))
        if index not in s.breakpoints:
            if s.long_segment and index < self.lm.num_layers - 1:
                self.device_lock.hand_over()
            return None
        layer_input = args[0] if args else kwargs.get("hidden_states")
        s.hidden = hidden
        s.held = [t for t in (hidden, layer_input, s.embeds) if isinstance(t, torch.Tensor)]
        self._pause(s, index)
        s.hidden, s.held = None, []
        return None

    def _pause(self, s: Session, index: int) -> None:
        """Give up the device and wait for resume (or close); come back resident, holding the device."""
        n = len(s.pending)  # (the first layer has put them in the KV: what it held before is the past)
        temps = s.act_charge - self._act_bytes(n, s.cache.seq_len - n)  # the layers' temporaries are gone while paused
        self.mem.release(s, temps)
        s.act_charge -= temps
        self._unpin_forward(s)
        self.device_lock.release()
        self._event(s, "paused", layer=index, state="paused")
        with s.cond:  # last: a failure before this answers the caller as the forward's error
            s.state, s.layer = State.PAUSED, index
            s.touch()
            s.cond.notify_all()
        while True:
            with s.cond:
                s.cond.wait_for(lambda: s.resume_requested or s.abort_requested)
                if s.abort_requested:
                    raise Aborted()
            try:
                self.device_lock.acquire(s.qos)
                self._pin_and(s, lambda: (s.stored.charge if s.stored is not None else 0) + temps,
                              lambda: (self.mem.swap_in(s, reason="resume", timeout=0),
                                       self.mem.reserve(s, temps, timeout=0)))
                s.act_charge += temps
                break
            except DjinnError as e:  # stays paused, intact; the resume caller gets the error
                if s.forward_pinned:
                    self._unpin_forward(s)
                self.device_lock.release()
                with s.cond:
                    s.error, s.resume_requested = e, False
                    s.cond.notify_all()
        with s.cond:
            s.state, s.layer, s.resume_requested = State.RUNNING, None, False
            s.touch()
            s.cond.notify_all()
        self.prefetch.computing(s)
        self._event(s, "resumed", layer=index)

    # -- inspect and patch -------------------------------------------------------------------------
    def inspect(self, sid, positions=None, channels=None) -> dict:
        s = self.get(sid)
        with self._paused_resident(s):
            return self._stats(s, positions, channels)

    def lens(self, sid, top_k: int, position: int) -> dict:
        """The logit lens at a pause: what the model would predict from this layer's hidden state."""
        s = self.get(sid)
        if self.lm.parts.lens_error:  # found at load: its final norm and head do not give its logits
            raise DjinnError("unsupported", self.lm.parts.lens_error)
        with self._paused_resident(s):
            n = s.hidden.shape[1]
            if not -n <= position < n:
                raise DjinnError("bad_params", f"'position' {position} is out of range: the paused forward holds {n} tokens")
            with torch.inference_mode():
                probs = torch.softmax(self.lm.lens_logits(s.hidden[0, position]).float(), dim=-1)
            top = probs.topk(min(top_k, probs.numel()))
            return {"layer": s.layer, "position": position % n,
                    "top": [{"token": t, "text": self.lm.decode([t]), "prob": p}
                            for p, t in zip(top.values.tolist(), top.indices.tolist())]}

    def patch(self, sid, op: str, value, positions=None, channels=None) -> dict:
        s = self.get(sid)
        with self._paused_resident(s):
            self._apply(s.hidden, op, value, positions, channels)
            s.patches.append({"op": op, "value": value, "positions": positions, "channels": channels, "layer": s.layer})
            out = self._stats(s, None, None)
        self._record(s)
        return out

    def _apply(self, h, op: str, value, positions, channels) -> None:
        """Patch hidden state `h` [1, T, H] in place: set, add or scale the selected part by `value`."""
        idx = self._index(h, positions, channels)
        target = h[idx]
        try:
            v = torch.as_tensor(value, dtype=h.dtype, device=h.device)
            v = torch.broadcast_to(v, target.shape) if v.dim() else v
        except (TypeError, ValueError, RuntimeError):
            shape = list(target.shape)
            raise DjinnError("bad_params", f"patch value does not fit the selected shape {shape}") from None
        with torch.inference_mode():  # the hidden state is an inference tensor, written only in that mode
            if op == "set":
                h[idx] = v
            elif op == "add":
                h[idx] = target + v
            else:
                h[idx] = target * v

    @contextlib.contextmanager
    def _paused_resident(self, s: Session):
        """Hold `s` paused and on the device while inspect or patch acts on its hidden state."""
        with s.op_lock:
            if s.state != State.PAUSED or s.hidden is None or s.closing:
                raise DjinnError("bad_state", f"session {s.id} is {s.state}, not paused at a breakpoint")
            self.mem.pin(s)
            try:
                self.mem.swap_in(s, reason="inspect")
                s.touch()
                yield
            finally:
                self.mem.unpin(s)

    def _index(self, h, positions, channels):
        """Index of the selected positions (of this forward's tokens) and channels of hidden [1, T, H]."""
        T, H = h.shape[1], h.shape[2]
        pos = self._check_list(positions, T, "positions")
        ch = self._check_list(channels, H, "channels")
        if pos is None and ch is None:
            return (slice(None),)
        if ch is None:
            return (0, pos)
        if pos is None:
            return (0, slice(None), ch)
        return (0, torch.tensor(pos).unsqueeze(1), torch.tensor(ch).unsqueeze(0))

    @staticmethod
    def _check_list(xs, n: int, what: str):
        if xs is None:
            return None
        if not all(-n <= x < n for x in xs):
            raise DjinnError("bad_params", f"'{what}' must be a non-empty list of indices in [0, {n})")
        return xs

    def _stats(self, s: Session, positions, channels) -> dict:
        h = s.hidden
        f = h.detach().float()
        rows = f[0]  # [T, H]: each position's own figures, for a debugger's per-token view
        out = {"layer": s.layer, "shape": list(h.shape), "dtype": str(h.dtype).removeprefix("torch."),
               "mean": f.mean().item(), "std": f.std().item() if f.numel() > 1 else 0.0,
               "min": f.min().item(), "max": f.max().item(), "norm": f.norm().item(),
               "per_position": {"mean": rows.mean(-1).tolist(),
                                "std": rows.std(-1).tolist() if rows.shape[1] > 1 else [0.0] * rows.shape[0],
                                "min": rows.amin(-1).tolist(), "max": rows.amax(-1).tolist(),
                                "norm": rows.norm(dim=-1).tolist()}}
        if positions is not None or channels is not None:
            sel = f[self._index(h, positions, channels)]
            if sel.numel() > MAX_VALUES:
                raise DjinnError("bad_params", f"the slice has {sel.numel()} values; at most {MAX_VALUES} may be returned")
            out["values"] = sel.tolist()
        return out

    # -- phases ------------------------------------------------------------------------------------
    def signal_phase(self, sid, phase: str, expected_ms=None) -> dict:
        s = self.get(sid)
        now = time.monotonic()
        s.waking = s.waking or phase == "IO_WAIT"
        self._event(s, "phase", phase=phase, expected_ms=expected_ms)
        if phase == "IO_WAIT":  # first to leave the device (at once under pressure), back before it is due
            self.prefetch.io_wait(s, expected_ms, now)
        else:  # back on the device now if it is out; a no-op when resident
            self.prefetch.compute(s)
        self._record(s)
        return s.info()

    # -- status --------------------------------------------------------------------------------------
    def _event(self, s: Session, action: str, **extra) -> None:
        fields = {"session": s.id, "action": action, "state": s.state, "layer": s.layer, "qos": s.qos,
                  "location": s.location, **extra}
        self.bus.emit("session", **fields)
