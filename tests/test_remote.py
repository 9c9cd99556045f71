"""Remote clients over TCP with CURVE keys (djinnd start --listen), on 127.0.0.1 only: the keys made
by `djinn keys`, requests and events as over the socket, and the peers refused (an unknown key, plain
text, a wrong server key), each logged once while the daemon serves on unchanged."""

import asyncio
import json
import time

import pytest
import zmq

from conftest import djinn, until
from test_debugger import idle, press_and_wait

from console.app import DjinnConsole
from console.screens.session import SessionScreen
from djinnd import AsyncClient, Client, DjinnError


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    """This test's client settings folder (keys, trusted servers), for its own process and its CLIs."""
    monkeypatch.setenv("DJINN_CONFIG", str(tmp_path / "cfg"))
    monkeypatch.delenv("DJINN_CONNECT", raising=False)
    monkeypatch.delenv("DJINN_SERVER_KEY", raising=False)
    return tmp_path / "cfg"


@pytest.fixture
def remote(make_daemon, cfg):
    """A daemon listening on a free port of 127.0.0.1, this user's key authorized, its key trusted."""
    d = make_daemon("--device", "cpu", "--listen", "tcp://127.0.0.1:0")
    with d.client() as c:
        d.listen = c.status()["listen"]
    client_key = d.run("djinn", "keys").stdout.strip()
    assert d.run("djinn", "keys", "authorize", client_key).returncode == 0
    server_key = d.run("djinn", "keys", "server").stdout.strip()
    assert server_key == d.listen["server_key"]
    assert d.run("djinn", "keys", "trust", d.listen["url"], server_key).returncode == 0
    d.url = d.listen["url"]
    return d


def test_keys_are_made_once_with_private_modes(remote, cfg):
    keys = remote.socket.with_name("djinnd.keys")
    for secret in (cfg / "client.key_secret", keys / "server.key_secret", keys / "authorized_keys"):
        assert secret.stat().st_mode & 0o077 == 0, secret
    assert (keys.stat().st_mode & 0o777) == 0o700
    again = remote.run("djinn", "keys")
    assert again.returncode == 0 and again.stdout.strip() == (cfg / "client.key").read_text().split('"')[1]


def test_a_remote_client_does_what_a_local_one_does_with_the_same_results(remote):
    with remote.client() as local, Client(url=remote.url) as far:
        assert far.status()["pid"] == local.status()["pid"]
        sid = far.create_session(token_ids=[5, 6, 7, 8])
        far.run_to(sid, layer=3)
        assert far.inspect(sid) == local.inspect(sid)
        far.patch(sid, scale=0.5)
        token = far.resume(sid)
        ref = local.create_session(token_ids=[5, 6, 7, 8])
        local.run_to(ref, layer=3)
        local.patch(ref, scale=0.5)
        assert local.resume(ref) == token
        assert far.generate(sid, 3) == local.generate(ref, 3)
        with far.subscribe(("session",)) as sub:
            time.sleep(0.3)  # the subscription reaches the publisher
            far.close(sid)
            ev = sub.recv(5.0)
        assert ev is not None and ev["action"] == "closed" and ev["session"] == sid


def test_the_cli_and_the_async_client_connect_by_url(remote):
    out = remote.run("djinn", "--connect", remote.url, "session", "create", "hello")
    assert out.returncode == 0, out.stderr
    sid = int(out.stdout)
    listed = remote.run("djinn", "--connect", remote.url, "session", "list", "--json")
    assert [s["id"] for s in json.loads(listed.stdout)] == [sid]

    async def go():
        async with AsyncClient(url=remote.url) as c:
            return (await c.session(sid))["id"]
    assert asyncio.run(go()) == sid


def _refused_lines(d) -> list[str]:
    return [line for line in d.log_file.read_text().splitlines() if "refused a connection" in line]


def test_unknown_key_plain_text_and_wrong_server_key_are_refused_and_logged_once(remote, tmp_path, monkeypatch):
    with remote.client() as c:
        sid = c.create_session(token_ids=[1, 2, 3])
        before = c.session(sid)
    # another user, whose key the daemon does not know
    stranger = {"DJINN_CONFIG": str(tmp_path / "stranger")}
    assert djinn("keys", env=stranger).returncode == 0
    assert djinn("keys", "trust", remote.url, remote.listen["server_key"], env=stranger).returncode == 0
    monkeypatch.setenv("DJINN_CONFIG", stranger["DJINN_CONFIG"])
    for _ in range(2):
        with pytest.raises(DjinnError) as e, Client(url=remote.url, timeout=5) as c:
            c.status()
        assert e.value.code == "refused" and "refused this client's key" in str(e.value)
    out = djinn("--connect", remote.url, "status", env=stranger)
    assert out.returncode == 1 and "refused this client's key" in out.stderr
    # plain text: a zmq client with no CURVE at all gets nothing
    for _ in range(3):
        plain = zmq.Context.instance().socket(zmq.DEALER)
        plain.linger = 0
        plain.connect(remote.url)
        plain.send(b'{"id": "x", "method": "status", "params": {}}')
        assert not plain.poll(1000)
        plain.close()
    time.sleep(0.5)
    handshakes = [line for line in _refused_lines(remote) if "refused a connection on" in line]
    assert handshakes and len(handshakes) <= 2, handshakes  # logged, once for each of the two ways it can fail
    # an authorized key, but the daemon's key is not the one given
    monkeypatch.setenv("DJINN_CONFIG", remote.env["DJINN_CONFIG"])
    for _ in range(3):
        with pytest.raises(DjinnError) as e, Client(url=remote.url, server_key=_any_key(), timeout=5) as c:
            c.status()
        assert e.value.code == "refused" and "server key" in str(e.value)
    time.sleep(0.5)
    lines = _refused_lines(remote)
    assert sum("a key not in" in line for line in lines) == 1, lines  # three attempts, one line
    whys = [line.split(": ", 2)[-1] for line in lines]
    assert len(whys) == len(set(whys)) <= 4, lines  # no kind logged twice
    with remote.client() as c:  # unchanged
        assert c.session(sid) == before and c.status()["sessions"] == 1


def _any_key() -> str:
    return zmq.curve_keypair()[0].decode()


def test_a_key_authorized_while_the_daemon_runs_is_let_in_at_once(make_daemon, cfg):
    d = make_daemon("--device", "cpu", "--listen", "tcp://127.0.0.1:0")
    with d.client() as c:
        listen = c.status()["listen"]
    d.run("djinn", "keys", "trust", listen["url"], listen["server_key"])
    key = d.run("djinn", "keys").stdout.strip()
    with pytest.raises(DjinnError) as e, Client(url=listen["url"], timeout=5) as far:
        far.ping()
    assert e.value.code == "refused"
    (d.socket.with_name("djinnd.keys") / "authorized_keys").write_text(f"# alice's laptop\n{key} alice\n")
    with Client(url=listen["url"], timeout=5) as far:
        assert far.ping() == {}


def test_bad_listen_addresses_stop_the_start_with_one_line(tmp_path, cfg):
    out = djinn("start", "--device", "cpu", "--socket", str(tmp_path / "x.sock"), "--listen", "udp://1.2.3.4:5",
                program="djinnd")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "--listen: not a TCP address" in out.stderr
    with Client(url="tcp://127.0.0.1:1", server_key=_any_key(), timeout=2) as c, pytest.raises(DjinnError) as e:
        c.ping()
    assert e.value.code == "no_key" and "djinn keys" in str(e.value)  # this user has no key yet
    assert djinn("keys").returncode == 0
    with Client(url="tcp://127.0.0.1:1", server_key=_any_key(), timeout=2) as c, pytest.raises(DjinnError) as e:
        c.ping()
    assert e.value.code == "no_daemon" and "tcp://127.0.0.1:1" in str(e.value)


def test_a_taken_port_stops_the_start_with_one_line(tmp_path):
    busy = zmq.Context.instance().socket(zmq.ROUTER)
    port = busy.bind_to_random_port("tcp://127.0.0.1")
    try:
        sock = tmp_path / "y.sock"
        out = djinn("start", "--device", "cpu", "--socket", str(sock), "--logs", str(tmp_path / "logs"),
                    "--listen", f"tcp://127.0.0.1:{port}", program="djinnd")
    finally:
        busy.close(0)
    assert out.returncode == 2 and f"cannot listen on tcp://127.0.0.1:{port}: Address already in use" in out.stderr
    assert not sock.exists()


@pytest.mark.asyncio
async def test_the_console_attaches_by_url_and_debugs_a_session(remote):
    with remote.client() as c:
        sid = c.create_session(prompt="Once upon a time")
    app = DjinnConsole(remote.url)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.state.attached and sid in app.state.sessions, what="attach over TCP")
        assert app.state.socket == remote.url and not app.check_action("start_daemon", ())
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, SessionScreen), what="the session screen")
        screen = app.screen
        await until(pilot, lambda: idle(screen) and screen.dbg.view.pieces, what="the session's text")
        await press_and_wait(pilot, screen, "s")  # one layer, over TCP
        assert screen.dbg.view.layer == 0
    with remote.client() as c:
        assert c.session(sid)["state"] == "paused" and c.session(sid)["layer"] == 0


def test_a_key_that_begins_with_a_dash_is_a_key_to_the_cli_not_an_option(tmp_path, cfg):
    """Z85 has "-": about one key in 85 begins with it (`djinn keys trust` failed on such a server key)."""
    from djinnd.remote import read_keys, trusted
    key = next(k for k in iter(lambda: zmq.curve_keypair()[0].decode(), None) if k.startswith("-"))
    out = djinn("keys", "trust", "tcp://127.0.0.1:5555", key)
    assert out.returncode == 0, out.stderr
    assert trusted() == {"tcp://127.0.0.1:5555": key}
    out = djinn("keys", "authorize", "--socket", str(tmp_path / "d.sock"), key)
    assert out.returncode == 0, out.stderr
    assert read_keys(tmp_path / "d.keys" / "authorized_keys") == {key}
