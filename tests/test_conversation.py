"""Reference experiment 2.3: a chat that keeps its session's KV across turns beats re-sending the
history at the first token, gives the same replies, and fails its verdict with the mechanism off."""

import pytest

from conftest import CONTRACT_KEYS, Daemon, assert_png, results, scenario

SMALL = ("--set", "turns=8", "--set", "user_tokens=96", "--set", "reply_tokens=8")  # 824 tokens re-sent at the last turn


@pytest.fixture(scope="module")
def djinnd(djinn_cache):
    d = Daemon("--device", "cpu").start()
    yield d
    d.remove()


def criteria(r: dict) -> dict:
    return {c["id"]: c for c in r["criteria"]}


def test_kept_kv_answers_first_with_the_same_replies_and_draws_the_turns(djinnd, tmp_path):
    out_dir = tmp_path / "on"
    out = scenario("run", "conversation", "--headless", "--output", str(out_dir), *SMALL, socket=djinnd.socket)
    r = results(out_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert r["status"] == "pass" and CONTRACT_KEYS <= set(r)
    kept, resend = r["turns"]["kept"], r["turns"]["resend"]
    assert len(kept) == len(resend) == 8
    assert [t["reply"] for t in kept] == [t["reply"] for t in resend] and all(len(t["reply"]) == 8 for t in kept)
    assert r["integrity"] == {"checked_sessions": 8, "mismatches": 0}
    assert [t["fed_tokens"] for t in kept[1:]] == [97] * 7  # the last reply token and the message
    assert [t["fed_tokens"] for t in resend] == [96 + 104 * i for i in range(8)]  # the whole history
    assert r["num_sessions_spawned"] == r["num_sessions_completed"] == 9
    h = r["headline"]
    assert h["mismatches"] == 0 and h["median_ttft_ratio_last_half"] <= 0.8
    assert_png(r, out_dir / "conversation.png")


def test_with_keep_off_the_verdict_fails_at_the_first_token(djinnd, tmp_path):
    out_dir = tmp_path / "off"
    out = scenario("run", "conversation", "--headless", "--output", str(out_dir), *SMALL, "--set", "keep=off",
                   socket=djinnd.socket)
    r = results(out_dir)
    assert out.returncode == 1, out.stdout + out.stderr
    assert r["status"] == "fail"
    cs = criteria(r)
    assert cs["ttft_kept_lower"]["ok"] is False
    assert cs["all_complete"]["ok"] and cs["tokens_equal"]["ok"]  # the chat itself is sound, only slower
    assert [t["fed_tokens"] for t in r["turns"]["kept"]] == [t["fed_tokens"] for t in r["turns"]["resend"]]
    assert any("keep = off" in n for n in r["notes"])
