"""The wire table (djinnd/wire.py) is the one source: the service, both clients and the protocol
document follow it, nothing else names a method, and bad parameters are stopped at the edge."""

import ast
import inspect
import json
import re

import pytest

from djinnd import wire
from djinnd.client import AsyncClient, Client, DjinnError
from djinnd.service import Service

from conftest import ROOT


def test_every_method_has_one_handler():
    assert set(Service.HANDLERS) == set(wire.METHODS)


@pytest.mark.parametrize("client", [Client, AsyncClient])
def test_every_method_has_a_client_call_taking_its_parameters(client):
    for m in wire.METHODS.values():
        fn = getattr(client, m.client, None)
        assert fn is not None, f"{client.__name__} has no call for {m.name} ({m.client})"
        sig = inspect.signature(fn).parameters
        if any(p.kind is p.VAR_KEYWORD for p in sig.values()) and not m.extra:
            continue  # takes any of them by name (scheduler.set: a left-out setting stays as it is)
        named = {n for n, p in sig.items() if n != "self" and p.kind is not p.VAR_KEYWORD}
        covers = {w for n in named for w in m.aliases.get(n, (n,))} - {"wait"}
        assert covers == {p.name for p in m.params}, f"{client.__name__}.{m.client} vs {m.name}"


def _strings(path):
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_only_the_wire_module_the_service_and_the_client_name_a_method():
    allowed = {"djinnd/wire.py", "djinnd/client.py", "djinnd/service.py", "djinnd/server.py"}
    offenders = []
    for path in [*ROOT.glob("djinnd/*.py"), *ROOT.glob("console/**/*.py"), *ROOT.glob("scenarios/*.py")]:
        rel = str(path.relative_to(ROOT))
        if rel not in allowed:
            offenders += [f"{rel}: {s}" for s in _strings(path) & set(wire.METHODS) if "." in s]
    assert not offenders


def test_the_protocol_document_lists_the_methods_as_the_table_does():
    doc = (ROOT / "docs" / "PROTOCOL.md").read_text()
    assert wire.protocol_table() in doc, "regenerate the table: python -c 'from djinnd import wire; print(wire.protocol_table())'"


BAD = [  # method, params, the parameter the error must name
    ("session.generate", {"session": 1, "max_new_tokens": 0}, "max_new_tokens"),
    ("session.generate", {"session": 1, "max_new_tokens": True}, "max_new_tokens"),
    ("session.generate", {"session": "1"}, "session"),
    ("session.generate", {}, "session"),
    ("session.generate", {"session": 1, "tokens": 3}, "tokens"),
    ("session.create", {"prompt": "x", "qos": "vip"}, "qos"),
    ("session.create", {"prompt": ""}, "prompt"),
    ("session.create", {"token_ids": [1, "a"]}, "token_ids"),
    ("session.run_to", {"session": 1, "layers": []}, "layers"),
    ("session.run_to", {"session": 1, "layers": [-1]}, "layers"),
    ("session.run_to", {"session": 1, "layer": 2}, "layer"),
    ("session.patch", {"session": 1, "op": "multiply", "value": 2}, "op"),
    ("session.patch", {"session": 1, "op": "set", "value": "x"}, "value"),
    ("session.inspect", {"session": 1, "positions": [0.5]}, "positions"),
    ("session.signal_phase", {"session": 1, "phase": "SLEEP"}, "phase"),
    ("session.signal_phase", {"session": 1, "phase": "IO_WAIT", "expected_ms": -1}, "expected_ms"),
    ("memory.set_budget", {"budget": "lots"}, "budget"),
    ("memory.set_swap", {"enabled": 1}, "enabled"),
    ("scheduler.set", {"max_concurrency": 0}, "max_concurrency"),
    ("snapshot", {"samples": -1}, "samples"),
    ("event.emit", {"type": "swap_out"}, "type"),
    ("scenario.abort", {"run": "1"}, "run"),
]


def test_bad_parameters_are_refused_at_the_edge_naming_the_parameter_and_change_nothing(daemon):
    with daemon.client(timeout=60) as c:
        sid = c.create_session(prompt="The capital of France is")
        expected = c.generate(sid, 4)
        c.close(sid)
        sid = c.create_session(prompt="The capital of France is")
        assert sid == 2
        c.generate(sid, 1)
        before = c.session(sid), c.status()["memory"]
        for method, params, name in BAD:
            with pytest.raises(DjinnError) as e:
                c.call(method, **{k: (sid if k == "session" and v == 1 else v) for k, v in params.items()})
            assert e.value.code == "bad_params" and re.search(rf"\b{name}\b", str(e.value)), (method, params, e.value)
            assert str(e.value).startswith(method) and "\n" not in str(e.value)
        assert (c.session(sid), c.status()["memory"]) == before
        assert [before[0]["tokens"][0]] + c.generate(sid, 3) == expected


def test_json_already_made_goes_into_a_reply_as_it_is_and_strings_stay_strings():
    from djinnd.protocol import RawJSON, encode
    kept = [json.dumps({"seq": i, "type": "session", "note": "\u0000 \"q\""}).encode() for i in range(3)]
    obj = {"events": RawJSON(b"[" + b",".join(kept) + b"]"), "lost": 0, "also": [RawJSON(b"{}"), "0", "{}"]}
    assert json.loads(encode(obj)) == {"events": [json.loads(k) for k in kept], "lost": 0, "also": [{}, "0", "{}"]}
