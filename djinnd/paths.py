"""Where the daemon's socket, event socket and pidfile live (CONTRACT.md), and where built models are cached."""

import os
from pathlib import Path


def default_socket() -> Path:
    """--socket, else $DJINN_SOCKET, else $XDG_RUNTIME_DIR/djinn/djinnd.sock, else /tmp/djinn-$UID/djinnd.sock."""
    if os.environ.get("DJINN_SOCKET"):
        return Path(os.environ["DJINN_SOCKET"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "djinn" / "djinnd.sock"
    return Path(f"/tmp/djinn-{os.getuid()}") / "djinnd.sock"


def resolve_socket(path=None) -> Path:
    return Path(path).expanduser().absolute() if path else default_socket().absolute()


def events_socket(sock: Path) -> Path:
    return sock.with_name(sock.stem + "-events.sock")


def pidfile(sock: Path) -> Path:
    return sock.with_name(sock.stem + ".pid")


def spill(sock: Path) -> Path:
    """The disk tier's default folder: beside the socket, the same for every daemon on it, so a start
    finds (and removes) the swap files of one that was killed."""
    return sock.with_name(sock.stem + ".spill")


def journal(sock: Path, state_dir: Path | None = None) -> Path:
    """The session journal (journal.py): beside the socket, or in --state-dir, named after the socket."""
    name = sock.stem + ".journal.sqlite"
    return Path(state_dir) / name if state_dir else sock.with_name(name)


def keys(sock: Path, state_dir: Path | None = None) -> Path:
    """The daemon's CURVE key pair and authorized keys (remote.py): in --state-dir, else beside the socket."""
    return Path(state_dir) / "keys" if state_dir else sock.with_name(sock.stem + ".keys")


def moves(sock: Path, state_dir: Path | None = None) -> Path:
    """The folder of session files moving between daemons (session.export writes them, session.import
    reads them): in --state-dir, else beside the socket, where the daemon's other state lives."""
    return Path(state_dir) / "moves" if state_dir else sock.with_name(sock.stem + ".moves")


def endpoint(path: Path) -> str:
    return f"ipc://{path}"


def default_logs_dir() -> Path:
    """logs/ of the checkout when run from it, else $DJINN_LOGS, else ./logs."""
    return Path(os.environ.get("DJINN_LOGS", "logs")).absolute()


def cache_dir() -> Path:
    """Where built models live: $DJINN_CACHE, $XDG_CACHE_HOME/djinn or ~/.cache/djinn."""
    if os.environ.get("DJINN_CACHE"):
        return Path(os.environ["DJINN_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "djinn"
    return Path.home() / ".cache" / "djinn"
