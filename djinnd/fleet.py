"""Many daemons on Ray (`pip install djinn[fleet]`): one djinnd per GPU as a Ray actor, a named
registry actor that says which daemon holds which session, sessions placed on the daemon with the
most free budget, and moved between daemons bit-exact as Ray objects.

Each `DaemonActor` runs a djinnd in a folder of its own on its node (socket, journal, keys), listening
on the node's address over TCP with CURVE (remote.py) and letting in the key of the user who brought
the fleet up: clients anywhere reach it as any remote client does. The registry (detached, in the
`djinn` namespace) outlives the driver that made it; `Fleet` is the client side. A daemon whose
process died is started again on its folder and its journal brings its sessions back; one whose
actor is gone is started again on the same node when it can be, else its sessions are reported
lost, by id. Nothing here is imported by the single-box daemon.
"""

import inspect
import os
import socket as socketlib
import time
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from . import remote
from .client import Client
from .protocol import DjinnError

NAMESPACE = "djinn"
REGISTRY = "djinn-registry"
PING_TIMEOUT_S = 10.0


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` ("auto": the one running on this machine) in the fleet's namespace."""
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=NAMESPACE, logging_level="warning", log_to_driver=False)


def fleet_folder() -> Path:
    """Where a node's daemons keep their folders: short, for the ipc socket paths."""
    return Path(os.environ.get("DJINN_FLEET_DIR", f"/tmp/djinn-fleet-{os.getuid()}"))


@ray.remote(num_cpus=0)
class Registry:
    """Which daemons there are, and which daemon holds each session (by fleet id NAME/ID), and the moves."""

    def __init__(self):
        self.daemons: dict[str, dict] = {}  # name -> info (url, server_key, node, folder, args, state)
        self.sessions: dict[str, list] = {}  # fleet id -> [daemon name, its session id]
        self.moves: list[dict] = []

    def add_daemon(self, info: dict) -> None:
        self.daemons[info["name"]] = info

    def set_state(self, name: str, **fields) -> None:
        self.daemons[name].update(fields)

    def remove_daemon(self, name: str) -> None:
        self.daemons.pop(name, None)

    def all(self) -> dict:
        return {"daemons": self.daemons, "sessions": self.sessions, "moves": self.moves}

    def place(self, fid: str, name: str, sid: int) -> None:
        self.sessions[fid] = [name, sid]

    def where(self, fid: str):
        return self.sessions.get(fid)

    def forget(self, fid: str) -> None:
        self.sessions.pop(fid, None)

    def moved(self, record: dict) -> None:
        self.sessions[record["session"]] = [record["to"], record["id"]]
        self.moves.append(record)


@ray.remote
class DaemonActor:
    """One djinnd on this node, in its own folder, serving remote clients by TCP."""

    def __init__(self, name: str, folder: str, args: list[str], client_key: str):
        from .pidfile import is_locked
        from .private import PrivateDaemon
        self.name, self.folder = name, Path(folder)
        keys = self.folder / "state" / "keys"
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        (keys / "authorized_keys").write_text(client_key + "\n")
        (keys / "authorized_keys").chmod(0o600)
        host = ray.util.get_node_ip_address()
        self.daemon = PrivateDaemon("--listen", f"tcp://{host}:0", "--state-dir", str(self.folder / "state"), *args,
                                    folder=self.folder)
        deadline = time.monotonic() + 30  # an earlier actor's daemon stops when that actor is gone (SIGTERM)
        while is_locked(self.daemon.socket) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not is_locked(self.daemon.socket):  # else one still serves there: it is adopted
            self.daemon.start()  # its journal brings its sessions back
        self.restarts = 0

    def info(self) -> dict:
        with self.daemon.client(timeout=10) as c:
            st = c.status()
        return {"name": self.name, "url": st["listen"]["url"], "server_key": st["listen"]["server_key"],
                "node": ray.get_runtime_context().get_node_id(), "host": socketlib.gethostname(),
                "folder": str(self.folder), "pid": st["pid"], "gpus": ray.get_gpu_ids()}

    def status(self) -> dict:
        """The daemon's status; a daemon whose process died is started again on its folder first."""
        proc = self.daemon.proc
        if proc is not None and proc.poll() is not None:
            self.daemon.start()  # its journal brings its sessions back
            self.restarts += 1
        with self.daemon.client(timeout=PING_TIMEOUT_S) as c:
            st = c.status()
        st["restarts"] = self.restarts
        return st

    def export(self, sid: int) -> bytes:
        """The session's bytes as the daemon exports them (the session stays until `close`)."""
        with self.daemon.client() as c:
            path = Path(c.export_session(sid)["path"])
        try:
            return path.read_bytes()
        finally:
            path.unlink(missing_ok=True)

    def adopt(self, data: bytes, qos: str | None = None) -> tuple[int, int]:
        """A session from another daemon's export: its id here, and the export's bytes."""
        with self.daemon.client() as c:
            folder = Path(c.status()["moves_dir"])
            name = f"incoming-{time.time_ns()}.djs"
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return c.import_session(name, qos=qos), len(data)

    def sessions(self) -> list[dict]:
        with self.daemon.client() as c:
            return c.sessions()

    def stop(self) -> int:
        return self.daemon.stop()


def up(daemons: int | None = None, gpus: bool | None = None, args: tuple[str, ...] = (), address: str | None = None,
       timeout: float = 300.0) -> list[dict]:
    """Start `daemons` djinnd actors (default: one per GPU of the cluster, else one), each on a bundle of
    one placement group (a GPU each, or a CPU each on a cluster without GPUs); their infos."""
    connect(address)
    gpus = bool(ray.cluster_resources().get("GPU")) if gpus is None else gpus
    n = daemons or (int(ray.cluster_resources().get("GPU", 0)) if gpus else 1) or 1
    registry = Registry.options(name=REGISTRY, lifetime="detached", get_if_exists=True,  # on the head node, not
                                resources={"node:__internal_head__": 0.001}).remote()  # a GPU node that may go
    have = ray.get(registry.all.remote())["daemons"]
    first = 1 + max((int(k.rsplit("-", 1)[1]) for k in have), default=-1)
    pg = placement_group([{"GPU": 1} if gpus else {"CPU": 1}] * n, strategy="SPREAD" if gpus else "PACK",
                         name=f"djinn-fleet-{first}", lifetime="detached")
    try:
        ray.get(pg.ready(), timeout=timeout)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise DjinnError("busy", f"the cluster has no room for {n} daemon(s) of one {'GPU' if gpus else 'CPU'} each "
                                 f"(it has {ray.cluster_resources()})") from None
    key = remote.keypair(remote.config_dir(), remote.CLIENT)[0]
    actors = []
    for i in range(n):
        name = f"djinnd-{first + i}"
        actors.append((name, _start_actor(name, list(args), key, gpus, PlacementGroupSchedulingStrategy(pg, i))))
    infos = []
    for i, (name, actor) in enumerate(actors):
        info = ray.get(actor.info.remote(), timeout=timeout)
        info.update(args=list(args), gpu=gpus, state="up", placement_group=f"djinn-fleet-{first}", bundle=i)
        ray.get(registry.add_daemon.remote(info))
        _trust(info)
        for s in ray.get(actor.sessions.remote()):  # restored from its journal
            ray.get(registry.place.remote(f"{name}/{s['id']}", name, s["id"]))
        infos.append(info)
    return infos


def _trust(info: dict) -> None:
    """The daemon's key trusted at its URL by this user (`djinn keys trust`), so that `djinn --connect
    URL` reaches it as any remote daemon; a restarted one listens on a new port."""
    if remote.trusted().get(info["url"]) != info["server_key"]:
        remote.trust(info["url"], info["server_key"])


def _start_actor(name: str, args: list[str], key: str, gpus: bool, strategy):
    folder = fleet_folder() / name
    resources = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": 1}
    return DaemonActor.options(name=name, lifetime="detached", max_concurrency=8, scheduling_strategy=strategy,
                               **resources).remote(name, str(folder), args, key)


class Fleet:
    """The client side: `Fleet().create_session(...)` places a session, and every session method
    (`generate`, `run_to`, ...) takes its fleet id and goes to the daemon that holds it now."""

    def __init__(self, address: str | None = None, timeout: float = 120.0):
        connect(address)
        self.registry = ray.get_actor(REGISTRY)
        self.timeout = timeout

    def daemons(self) -> dict[str, dict]:
        return ray.get(self.registry.all.remote())["daemons"]

    def status(self) -> dict:
        """Every daemon's state and figures: `up` (with its status), `restarted` (its process had died,
        its journal brought its sessions back), `moved` (its actor was gone: started again on its node),
        or `dead` with the fleet ids of the sessions lost with it. Sessions never vanish silently."""
        reg = ray.get(self.registry.all.remote())
        out = {}
        for name, info in reg["daemons"].items():
            row = dict(info)
            try:
                st = ray.get(ray.get_actor(name).status.remote(), timeout=PING_TIMEOUT_S * 2)
                row.update(state="up" if not st["restarts"] else "restarted", status=st, url=st["listen"]["url"],
                           pid=st["pid"])  # a restarted daemon listens on a new port
                _trust(row)
            except (RayError, ValueError, DjinnError) as e:  # its actor is dead, unreachable or not answering
                row.update(self._heal(name, info, e, reg["sessions"]))
            ray.get(self.registry.set_state.remote(name, **{k: row[k] for k in ("state", "url", "pid") if k in row},
                                                   lost=row.get("lost", [])))
            out[name] = row
        return {"daemons": out, "sessions": reg["sessions"], "moves": reg["moves"]}

    def _heal(self, name: str, info: dict, why: Exception, sessions: dict) -> dict:
        """Its actor is gone: a new one on its placement group's bundle (the same node and GPU) and
        folder (the journal restores the sessions); when its node is gone, the sessions it held are
        reported lost."""
        lost = [fid for fid, (d, _) in sessions.items() if d == name]
        if not any(n["NodeID"] == info["node"] and n["Alive"] for n in ray.nodes()):
            return {"state": "dead", "lost": lost, "why": f"its node {info['node'][:8]} is gone ({why})"}
        try:
            key = remote.keypair(remote.config_dir(), remote.CLIENT)[0]
            bundle = PlacementGroupSchedulingStrategy(get_placement_group(info["placement_group"]), info["bundle"])
            actor = _start_actor(name, info["args"], key, info["gpu"], bundle)  # its GPU, on its node
            st = ray.get(actor.status.remote(), timeout=PING_TIMEOUT_S * 6)
            fresh = ray.get(actor.info.remote())
            ray.get(self.registry.add_daemon.remote({**info, **fresh, "state": "moved"}))
            _trust(fresh)
            return {**fresh, "state": "moved", "status": st, "why": str(why)}
        except Exception as e:  # noqa: BLE001 - whatever failed, the sessions are reported, not dropped
            return {"state": "dead", "lost": lost, "why": f"{why}; restart failed: {e}"}

    def _where(self, fid: str) -> tuple[dict, int]:
        at = ray.get(self.registry.where.remote(fid))
        if at is None:
            raise DjinnError("unknown_session", f"no session {fid} in the fleet")
        return self.daemons()[at[0]], at[1]

    def client(self, daemon: dict) -> Client:
        return Client(url=daemon["url"], server_key=daemon["server_key"], timeout=self.timeout)

    def create_session(self, prompt: str | None = None, token_ids=None, qos: str = "interactive",
                       daemon: str | None = None) -> str:
        """A new session on `daemon`, else on the daemon with the most free budget; its fleet id."""
        if daemon is None:
            daemon = max(self._up(), key=lambda kv: kv[1]["memory"]["budget_bytes"] - kv[1]["memory"]["device_bytes"])[0]
        info = self.daemons()[daemon]
        with self.client(info) as c:
            sid = c.create_session(prompt=prompt, token_ids=token_ids, qos=qos)
        fid = f"{daemon}/{sid}"
        ray.get(self.registry.place.remote(fid, daemon, sid))
        return fid

    def _up(self) -> list[tuple[str, dict]]:
        rows = [(n, r["status"]) for n, r in self.status()["daemons"].items() if r["state"] != "dead"]
        if not rows:
            raise DjinnError("no_daemon", "no daemon of the fleet is up: `djinn fleet up`")
        return rows

    def move(self, fid: str, to: str) -> dict:
        """Move the session to daemon `to`: exported where it is, passed as a Ray object, imported
        there bit-exact, then closed at the source. The move's record (also an event on both daemons)."""
        src, sid = self._where(fid)
        if src["name"] == to:
            raise DjinnError("bad_params", f"{fid} is on {to} already")
        t0 = time.perf_counter()
        data = ray.get_actor(src["name"]).export.remote(sid)
        new, nbytes = ray.get(ray.get_actor(to).adopt.remote(data))  # the bytes never pass through here
        seconds = time.perf_counter() - t0
        with self.client(src) as c:
            c.close(sid)
        record = {"session": fid, "from": src["name"], "to": to, "id": new, "seconds": round(seconds, 4),
                  "bytes": nbytes, "at": time.time()}
        ray.get(self.registry.moved.remote(record))
        daemons = self.daemons()
        for name in (src["name"], to):
            with self.client(daemons[name]) as c:
                c.emit("fleet", action="moved", **{k: v for k, v in record.items() if k != "at"})
        return record

    def close(self, fid: str) -> None:
        daemon, sid = self._where(fid)
        with self.client(daemon) as c:
            c.close(sid)
        ray.get(self.registry.forget.remote(fid))

    def __getattr__(self, method: str):
        """Any session method of Client, by fleet id: `fleet.generate(fid, 4)`."""
        fn = getattr(Client, method, None)
        if method.startswith("_") or not callable(fn) or list(inspect.signature(fn).parameters)[1:2] != ["sid"]:
            raise AttributeError(method)

        def call(fid: str, *args, **kw):
            daemon, sid = self._where(fid)
            try:
                with self.client(daemon) as c:
                    return getattr(c, method)(sid, *args, **kw)
            except DjinnError as e:
                if e.code != "no_daemon":
                    raise
            self.status()  # its daemon is down or elsewhere: heal the fleet, then once more
            daemon, sid = self._where(fid)
            with self.client(daemon) as c:
                return getattr(c, method)(sid, *args, **kw)
        return call


def down(address: str | None = None) -> list[str]:
    """Stop every daemon of the fleet and the registry. The daemons' folders stay: a later `up` on
    the same nodes restores their sessions (under the same fleet ids)."""
    connect(address)
    try:
        registry = ray.get_actor(REGISTRY)
    except ValueError:
        return []
    daemons = ray.get(registry.all.remote())["daemons"]
    for name, info in daemons.items():
        try:
            actor = ray.get_actor(name)
            ray.get(actor.stop.remote(), timeout=60)
            ray.kill(actor)
        except (ValueError, RayError):  # gone already
            pass
    for pg in {info.get("placement_group") for info in daemons.values()} - {None}:
        try:
            remove_placement_group(get_placement_group(pg))
        except ValueError:  # already gone
            pass
    ray.kill(registry)
    return list(daemons)
