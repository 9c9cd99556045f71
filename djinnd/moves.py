"""A session's file for moving it to another daemon of a fleet (session.export, session.import).

One line of JSON, the header, then the KV bytes of the session's slab up to its seq_len in the slab's
own layout ([layers, 2, 1, kv_heads, seq_len, head_dim], C order). The header holds what the importing
daemon needs to hold the session as the exporter held it: its tokens as the runtime held them (prompt,
generated, pending input), QoS, phase, the forwards that built its KV (the journal's history), the KV's
layout and the sha256 of its bytes. The files live in the daemon's moves folder (paths.moves: 0700,
each file 0600), and an import takes a bare name in that folder only.
"""

import errno
import hashlib
import json
import os
import stat
import time
from pathlib import Path

from .protocol import DjinnError
from .scheduler import QOS_CLASSES

FORMAT = "djinn-session/1"
MAX_HEADER = 64 << 20  # bytes: a header is its tokens as JSON, ~8 bytes each


def prepare(folder) -> Path:
    """The moves folder, made if missing, mode 0700 either way: its files are sessions' tokens and KV."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def layout(cache, capacity: int | None = None) -> dict:
    """The header's `kv`: the shape and dtype of a slab's bytes up to its seq_len, and its capacity
    (the importer's slab gets the same, so it grows when the exporter's would have)."""
    n = cache.seq_len
    return {"shape": [cache.num_layers, 2, 1, cache.kv_heads, n, cache.head_dim],
            "dtype": str(cache.dtype).removeprefix("torch."), "seq_len": n,
            "capacity": cache.capacity if capacity is None else capacity}


def write(folder, sid: int, header: dict, chunks: list[bytes]) -> dict:
    """Write session `sid`'s file (the header, with the KV's size and sha256 added, then `chunks`) into
    the moves folder: under a hidden name first, renamed when whole, so an importer never sees half of
    it. The reply of session.export: its name, path, size and the KV's sha256."""
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(c)
    header = {"format": FORMAT, **header}
    header["kv"] = {**header["kv"], "bytes": sum(map(len, chunks)), "sha256": digest.hexdigest()}
    name = f"session-{sid}-{time.time_ns()}.djs"
    try:
        folder = prepare(folder)
        path, part = folder / name, folder / f".{name}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(header, separators=(",", ":")).encode() + b"\n")
                for c in chunks:
                    f.write(c)
            os.replace(part, path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        size = path.stat().st_size
    except OSError as e:
        raise DjinnError("internal", f"session.export: cannot write {name} in {folder}: {e.strerror or e}") from None
    return {"file": name, "path": str(path.absolute()), "bytes": size, "sha256": header["kv"]["sha256"]}


def _bad(message: str) -> DjinnError:
    return DjinnError("bad_params", f"session.import: {message}")


def read(folder, name: str, lm) -> tuple[dict, bytearray, Path]:
    """The checked header and KV bytes of the file `name` in the moves folder, and its path; a name
    that is not a bare one there, a file not written by session.export for this model's layout, a
    truncated or damaged one: bad_params naming what is wrong (the file is only read)."""
    if "/" in name or "\0" in name or ".." in name or name.startswith("."):
        raise _bad(f"'file' must be the bare name of a file in the moves folder {folder}, not {name!r}")
    path = Path(folder) / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise _bad(f"no file {name!r} in the moves folder {folder}" if e.errno == errno.ENOENT
                   else f"cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _bad(f"{path} is not a regular file")
        line = f.readline(MAX_HEADER)
        if not line.endswith(b"\n"):
            raise _bad(f"{name} has no header line: it is truncated, or not a session file")
        try:
            header = json.loads(line)
        except ValueError:
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise _bad(f"{name} is not a session file (no {FORMAT} header)")
        if header.get("model") != lm.name:
            raise _bad(f"{name} holds a session of model {header.get('model')!r}; this daemon serves {lm.name!r}")
        check(name, header, lm)
        n = header["kv"]["bytes"]
        kv = bytearray(n)
        got = f.readinto(kv)
        if got < n:
            raise _bad(f"{name} is truncated: {got} of its {n} KV bytes")
        if f.read(1):
            raise _bad(f"{name} holds more than the {n} KV bytes its header gives")
    if hashlib.sha256(kv).hexdigest() != header["kv"]["sha256"]:
        raise _bad(f"{name}: the sha256 of its KV bytes is not its header's (the file is damaged)")
    return header, kv, path


def _ints(v, empty: bool = False) -> bool:
    return isinstance(v, list) and (empty or bool(v)) and all(type(x) is int for x in v)


def _segment(x) -> bool:
    """[tokens, times], or [tokens, 1, patches] for a patched forward (Runtime's history of its KV)."""
    return isinstance(x, list) and (_ints(x) and len(x) == 2 or len(x) == 3 and _ints(x[:2]) and isinstance(x[2], list))


def check(name: str, h: dict, lm) -> None:
    """The header holds together and fits this daemon's model: types, token ids, the pending input
    as the tail of the tokens past the KV, the context, the KV's layout and size (before it is read)."""
    kv = h.get("kv") if isinstance(h.get("kv"), dict) else {}
    fields = {"prompt": _ints(h.get("prompt")), "generated": _ints(h.get("generated"), empty=True),
              "pending": _ints(h.get("pending")), "qos": h.get("qos") in QOS_CLASSES,
              "phase": h.get("phase") in ("COMPUTE", "IO_WAIT"),
              "segments": isinstance(h.get("segments"), list) and all(_segment(x) for x in h["segments"]),
              "kv": all(type(kv.get(k)) is int and kv[k] >= 0 for k in ("seq_len", "capacity", "bytes"))
              and _ints(kv.get("shape")) and isinstance(kv.get("dtype"), str) and isinstance(kv.get("sha256"), str)}
    wrong = [k for k, ok in fields.items() if not ok]
    if wrong:
        raise _bad(f"{name}: its header's {wrong[0]!r} is missing or malformed")
    tokens, n = h["prompt"] + h["generated"], kv["seq_len"]
    if not all(0 <= t < lm.vocab_size for t in tokens + h["pending"]):
        raise _bad(f"{name}: token ids past this model's vocabulary of {lm.vocab_size}")
    if tokens[n:] != h["pending"]:
        raise _bad(f"{name}: its pending input is not its tokens after the {n} its KV holds")
    if lm.context_length is not None and len(tokens) > lm.context_length:
        raise _bad(f"{name}: {len(tokens)} tokens, past the model's context of {lm.context_length}")
    cache = lm.new_cache()  # (no slab yet: only its layout)
    want = layout(cache, kv["capacity"])
    want["shape"][4] = want["seq_len"] = n
    got = {k: kv[k] for k in want}
    if got != want or n > kv["capacity"]:
        raise _bad(f"{name}: its KV layout {got} is not this daemon's {want}")
    if kv["bytes"] != cache.bytes_for(n):
        raise _bad(f"{name}: its header gives {kv['bytes']} KV bytes; {n} tokens hold {cache.bytes_for(n)}")
