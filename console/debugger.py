"""Drives one session's forward layer by layer through the public client, for the session screen.

The daemon pauses a forward only at the breakpoints it was started with, so the debugger starts
every forward with a breakpoint after each layer and resumes through those the operator did not
ask for, reading the logit lens at each: that is the lens of every layer up to the pause. Plain
data (`View`) holds what the screen draws, so a snapshot can draw it without a daemon.
"""

from dataclasses import dataclass, field
from typing import Awaitable, Callable

from djinnd import DjinnError

from .link import rpc

LENS_TOP = 3


@dataclass
class View:
    """What the session screen shows; the debugger fills it, the screen only reads it."""

    sid: int
    info: dict = field(default_factory=dict)  # session.get
    num_layers: int = 0
    pieces: list[str] = field(default_factory=list)  # each token's text: the prompt, then what was generated
    breakpoints: set[int] = field(default_factory=set)
    layer: int | None = None  # where the forward is paused
    forward_len: int = 0  # tokens of the paused forward: the last `forward_len` of `pieces`
    position: int = -1  # the position the lens reads, in the paused forward
    lens: dict[int, dict] = field(default_factory=dict)  # layer -> {"position", "top"} of this forward
    stats: dict | None = None  # session.inspect at the pause
    lens_error: str = ""  # why this model has no lens (its final norm and head do not give its logits)
    note: str = ""  # the last thing that happened, one line


class Debugger:
    def __init__(self, socket, sid: int, num_layers: int, changed: Callable[[], None] = lambda: None):
        self.socket = socket
        self.view = View(sid, num_layers=num_layers)
        self.changed = changed  # called whenever the view changed (the screen redraws)
        self.busy = False

    async def call(self, fn: Callable[..., Awaitable], timeout: float = 120.0):
        return await rpc(self.socket, fn, timeout=timeout)

    # -- what the session is ----------------------------------------------------------------------
    async def refresh(self) -> None:
        """The session's info and text; at a pause also the lens and statistics there."""
        v = self.view
        v.info = await self.call(lambda c: c.session(v.sid))
        ids = v.info.get("prompt_ids", []) + v.info.get("tokens", [])
        v.pieces = await self.call(lambda c: c.pieces(ids)) if ids else []
        if v.info.get("state") == "paused":
            if v.layer is None:  # a forward this screen did not start: its breakpoints are another's
                v.note = "paused by another request: s, n and c resume it to that forward's own breakpoints"
            await self._observe(v.info.get("layer"), stats=True)
        else:
            self._idle()
        self.changed()

    def _idle(self) -> None:
        v = self.view
        v.layer, v.stats, v.forward_len = None, None, 0

    async def _observe(self, layer: int | None, stats: bool) -> None:
        """At a pause: the lens at the chosen position, and (at a stop) the hidden state's figures."""
        v = self.view
        if not v.lens_error:
            try:
                lens = await self.call(lambda c: c.lens(v.sid, top_k=LENS_TOP, position=v.position))
                layer = lens["layer"]
                v.lens[layer] = {"position": lens["position"], "top": lens["top"]}
            except DjinnError as e:
                if e.code != "unsupported":
                    raise
                v.lens_error = e.message
        if layer is None or stats:
            v.stats = await self.call(lambda c: c.inspect(v.sid))
            v.forward_len, layer = v.stats["shape"][1], v.stats["layer"]
        v.layer = layer
        self.changed()

    # -- moving the forward -------------------------------------------------------------------------
    async def step(self) -> None:
        """One layer on: start a forward (pausing after layer 0), or resume to the next layer."""
        await self._advance(lambda layer: True)

    async def next(self) -> None:
        """On to the next breakpoint the operator set (or the end of the forward)."""
        await self._advance(lambda layer: layer in self.view.breakpoints)

    async def finish(self) -> None:
        """On to the end of the forward: its token."""
        await self._advance(lambda layer: False)

    async def _advance(self, stop_at: Callable[[int], bool]) -> None:
        v = self.view
        if v.layer is None:
            if v.info.get("state") == "paused":  # paused by another client: its breakpoints, not ours
                await self.refresh()
            else:
                await self._start()
                if stop_at(v.layer):
                    return await self._stopped()
        while True:
            token = await self.call(lambda c: c.resume(v.sid))
            if token is not None:
                return await self._ended(token)
            await self._observe(None, stats=False)
            if stop_at(v.layer):
                return await self._stopped()

    async def _start(self) -> None:
        v = self.view
        got = await self.call(lambda c: c.run_to(v.sid, layers=list(range(v.num_layers))))
        v.lens.clear()
        v.position = -1
        await self._observe(got["layer"], stats=False)  # the figures come where it stops (_stopped)

    async def _stopped(self) -> None:
        v = self.view
        v.stats = await self.call(lambda c: c.inspect(v.sid))
        v.forward_len = v.stats["shape"][1]
        v.note = f"paused after layer {v.layer}"
        v.info = await self.call(lambda c: c.session(v.sid))
        self.changed()

    async def _ended(self, token: int) -> None:
        v = self.view
        self._idle()
        v.pieces += await self.call(lambda c: c.pieces([token]))
        v.info = await self.call(lambda c: c.session(v.sid))
        v.note = f"the forward ended: token {token} {v.pieces[-1]!r}"
        self.changed()

    async def generate(self, n: int) -> None:
        """Finish a paused forward, then n tokens, each shown as it comes."""
        v = self.view
        if v.layer is not None:
            await self.finish()
        for i in range(n):
            token, = await self.call(lambda c: c.generate(v.sid, 1))
            v.pieces += await self.call(lambda c: c.pieces([token]))
            v.note = f"generating: {i + 1} of {n}"
            self.changed()
        v.info = await self.call(lambda c: c.session(v.sid))
        v.note = f"generated {n} tokens"
        self.changed()

    # -- at a pause ---------------------------------------------------------------------------------
    async def move(self, by: int) -> None:
        """Move the lens to another position of the paused forward and read it there."""
        v = self.view
        if v.layer is None or not v.forward_len:
            return
        v.position = (v.position % v.forward_len + by) % v.forward_len
        await self._observe(v.layer, stats=False)

    async def patch(self, op: str, value: float, positions: list[int] | None, channels: list[int] | None) -> None:
        v = self.view
        v.stats = await self.call(lambda c: c.patch(v.sid, positions=positions, channels=channels, **{op: value}))
        await self._observe(v.layer, stats=False)  # the lens of the patched state
        v.note = f"patched: {op} {value:g}" + (f" at positions {positions}" if positions else "") + \
            (f", channels {channels}" if channels else "")
        self.changed()


def parse_layers(text: str, num_layers: int) -> set[int]:
    """'3 7 10-12' (commas or spaces) -> {3, 7, 10, 11, 12}; ValueError with a one-line reason."""
    out = set()
    for part in text.replace(",", " ").split():
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"{part!r} is not a layer number or range") from None
        if not 0 <= a <= b < num_layers:
            raise ValueError(f"{part!r}: layers are 0..{num_layers - 1}")
        out.update(range(a, b + 1))
    return out


def parse_indices(text: str) -> list[int] | None:
    """'0 -1 3' -> [0, -1, 3]; blank -> None (all)."""
    try:
        xs = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{text!r}: give whole numbers separated by spaces") from None
    return xs or None
