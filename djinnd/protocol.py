"""The wire format of docs/PROTOCOL.md: versioned JSON frames with request ids and structured errors."""

import json
import os

VERSION = 1
MAX_FRAME = 1 << 20


class DjinnError(Exception):
    """A failure with a machine-readable code; raised by the runtime and by the client alike."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self):
        return self.message


class RawJSON:
    """JSON text already made (the event history keeps its events so): a reply takes it as it is."""
    __slots__ = ("text",)

    def __init__(self, text: bytes):
        self.text = text


def encode(obj) -> bytes:
    raw: list[bytes] = []
    tag = os.urandom(6).hex()  # a placeholder no string in `obj` can spell

    def default(o):
        if isinstance(o, RawJSON):
            raw.append(o.text)
            return f"{tag}{len(raw) - 1}"
        return _default(o)

    out = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=default).encode()
    for i, text in enumerate(raw):
        out = out.replace(f'"{tag}{i}"'.encode(), text, 1)
    return out


def _default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def request(rid: str, method: str, params: dict | None = None) -> bytes:
    return encode({"v": VERSION, "id": rid, "method": method, "params": params or {}})


def ok(rid, result) -> bytes:
    return encode({"v": VERSION, "id": rid, "ok": True, "result": result})


def error(rid, code: str, message: str) -> bytes:
    return encode({"v": VERSION, "id": rid, "ok": False, "error": {"code": code, "message": message}})


def parse_request(frame: bytes) -> tuple[str | None, str, dict]:
    """Return (id, method, params) or raise DjinnError; the id is kept when readable so errors can be matched."""
    if len(frame) > MAX_FRAME:
        raise DjinnError("oversized", f"frame of {len(frame)} bytes is over the {MAX_FRAME}-byte limit")
    try:
        msg = json.loads(frame)
    except (UnicodeDecodeError, ValueError):
        raise DjinnError("malformed", "request is not a JSON object") from None
    if not isinstance(msg, dict):
        raise DjinnError("malformed", "request is not a JSON object")
    rid = msg.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise DjinnError("malformed", "request has no string 'id'")
    rid = str(rid)
    if msg.get("v") != VERSION:
        raise _with_id(DjinnError("bad_version", f"protocol version {msg.get('v')!r} is not supported (need {VERSION})"), rid)
    method, params = msg.get("method"), msg.get("params", {})
    if not isinstance(method, str):
        raise _with_id(DjinnError("malformed", "request has no string 'method'"), rid)
    if not isinstance(params, dict):
        raise _with_id(DjinnError("bad_params", "'params' must be an object"), rid)
    return rid, method, params


def _with_id(err: DjinnError, rid: str) -> DjinnError:
    err.rid = rid
    return err
