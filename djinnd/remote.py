"""Remote clients over TCP, authenticated and encrypted by ZeroMQ's CURVE.

`djinnd start --listen tcp://HOST:PORT` binds its request socket there too (and its event stream on
PORT+1; port 0: any free ones), as a CURVE server with the key pair it makes at its first start in
its keys folder (0600). The ZAP handler (peers.py) admits a client whose public key is a line of the
authorized-keys file, read again when the file changes: adding a key needs no restart. A client
holds a key pair of its own (`djinn keys`, in ~/.config/djinn) and the daemon's public key
(`djinn keys trust URL KEY` remembers it for that URL; or DJINN_SERVER_KEY, or server_key=).
The Unix sockets stay as they are: CURVE applies to the endpoints bound after it is set.
"""

import itertools
import os
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.utils import z85

from .protocol import DjinnError

CLIENT = "client"
SERVER = "server"
_watches = itertools.count()  # each watch its own inproc address: one unbinds only after its socket closes


def config_dir() -> Path:
    """A user's djinn settings: $DJINN_CONFIG, $XDG_CONFIG_HOME/djinn or ~/.config/djinn."""
    if os.environ.get("DJINN_CONFIG"):
        return Path(os.environ["DJINN_CONFIG"]).expanduser()
    base = Path(os.environ["XDG_CONFIG_HOME"]).expanduser() if os.environ.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "djinn"


def keypair(folder: Path, name: str, create: bool = True) -> tuple[str, str] | None:
    """(public, secret) Z85 keys of folder/NAME.key_secret; made there (0600, the folder 0700) when
    missing and `create`, else None."""
    secret = Path(folder) / f"{name}.key_secret"
    if not secret.exists():
        if not create:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True, mode=0o700)
        old = os.umask(0o077)
        try:
            zmq.auth.create_certificates(folder, name)
        finally:
            os.umask(old)
    public, private = zmq.auth.load_certificate(secret)
    return public.decode(), private.decode()


def check_key(text: str) -> str:
    """A public key as given by a user: 40 Z85 characters (32 bytes), else ValueError."""
    key = text.strip()
    try:
        ok = len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"not a CURVE public key (40 Z85 characters): {key[:50]!r}")
    return key


def read_keys(path: Path) -> set[str]:
    """The keys of an authorized-keys file: the first word of each line that is a key (anything after
    it, and lines that are not keys, are comments: '#' itself is a Z85 character)."""
    keys = set()
    for line in Path(path).read_text().splitlines():
        words = line.split()
        try:
            keys.add(check_key(words[0]))
        except (ValueError, IndexError):
            pass
    return keys


def is_url(target) -> bool:
    """Whether a daemon's address given as a socket is a TCP address."""
    return isinstance(target, str) and target.startswith("tcp://")


def check_url(url: str) -> str:
    """tcp://HOST:PORT, else ValueError."""
    parts = urlsplit(url)
    try:
        ok = parts.scheme == "tcp" and parts.hostname and parts.port is not None and not parts.path
    except ValueError:  # a port that is not a number
        ok = False
    if not ok:
        raise ValueError(f"not a TCP address tcp://HOST:PORT: {url!r}")
    return url


def events_url(url: str) -> str:
    """Where the event stream listens beside requests on `url`: the next port (0 stays 0)."""
    parts = urlsplit(url)
    port = parts.port + 1 if parts.port else 0
    return f"tcp://{parts.netloc.rsplit(':', 1)[0]}:{port}"


def on_host_of(url: str, bound: str) -> str:
    """`bound` (an address the daemon bound, maybe 0.0.0.0) at the host the client reached it by."""
    return f"tcp://{urlsplit(url).netloc.rsplit(':', 1)[0]}:{urlsplit(bound).port}"


def listen(sock: zmq.Socket, url: str, keys: tuple[str, str]) -> str:
    """Bind `sock` at `url` as a CURVE server; the address bound (its port when `url` said 0)."""
    sock.curve_publickey, sock.curve_secretkey = keys[0].encode(), keys[1].encode()
    sock.curve_server = True
    sock.bind(url)
    return sock.get(zmq.LAST_ENDPOINT).decode()


def server_key_for(url: str, given: str | None = None) -> str:
    """The daemon's public key a client expects at `url`: given, $DJINN_SERVER_KEY, or the one
    `djinn keys trust` remembered for it."""
    key = given or os.environ.get("DJINN_SERVER_KEY") or trusted().get(url)
    if not key:
        raise DjinnError("no_key", f"no server key for {url}: `djinn keys trust {url} KEY` with the key "
                                   "`djinn keys server` shows on the daemon's machine (or set DJINN_SERVER_KEY)")
    return key


def trusted() -> dict[str, str]:
    path = config_dir() / "servers"
    if not path.exists():
        return {}
    pairs = (line.split() for line in path.read_text().splitlines())
    return {p[0]: p[1] for p in pairs if len(p) >= 2 and is_url(p[0])}


def trust(url: str, key: str) -> Path:
    """Remember `key` as the daemon's public key at `url`."""
    known = trusted()
    known[check_url(url)] = check_key(key)
    path = config_dir() / "servers"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text("".join(f"{u} {k}\n" for u, k in known.items()))
    return path


def secure(sock: zmq.Socket, server_key: str) -> None:
    """Make `sock` a CURVE client (this user's key pair) of the daemon whose public key is `server_key`."""
    keys = keypair(config_dir(), CLIENT, create=False)
    if keys is None:
        raise DjinnError("no_key", f"no client key in {config_dir()}: make one with `djinn keys`, then have its public "
                                   "key added to the daemon's authorized keys")
    sock.curve_publickey, sock.curve_secretkey = keys[0].encode(), keys[1].encode()
    sock.curve_serverkey = server_key.encode()


HANDSHAKES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_SUCCEEDED)


def watch(sock: zmq.Socket, events: int = HANDSHAKES) -> zmq.Socket:
    """A socket that receives `sock`'s monitor events, its handshakes' outcomes unless told (see
    `why_not`); call before connecting or binding."""
    address = f"inproc://djinn-watch-{os.getpid()}-{next(_watches)}"
    sock.monitor(address, events)
    w = zmq.Context.shadow(sock.context.underlying).socket(zmq.PAIR)
    w.setsockopt(zmq.LINGER, 0)
    w.connect(address)
    return w


def why_not(watch: zmq.Socket, url: str) -> DjinnError:
    """Why no connection to `url` was made, from its watch's events."""
    from zmq.utils.monitor import parse_monitor_message
    events = []
    while watch.poll(0):
        events.append(parse_monitor_message(watch.recv_multipart())["event"])
    if zmq.EVENT_HANDSHAKE_FAILED_AUTH in events:
        return DjinnError("refused", f"djinnd at {url} refused this client's key: add the public key `djinn keys` "
                                     "shows to its authorized keys")
    if events:
        return DjinnError("refused", f"no secure handshake with {url}: the server key given for it is not that "
                                     "daemon's (`djinn keys server` on its machine shows it)")
    return DjinnError("no_daemon", f"no djinnd answers at {url} (nothing listens there, or it is not reachable)")


def unwatch(sock: zmq.Socket, watch: zmq.Socket | None) -> None:
    if watch is not None:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        watch.close(0)
