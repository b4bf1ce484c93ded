"""Pure mesh logic: broker choice, membership and election state machines."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshllm.mesh.broker import BrokerAd, BrokerURL, choose_broker
from meshllm.mesh.election import Election
from meshllm.mesh.membership import Membership

ids = st.lists(st.text("abcdef0123", min_size=1, max_size=6), min_size=1, max_size=8, unique=True)


def test_configured_broker_wins_over_everything() -> None:
    ads = [BrokerAd("mqtt://10.0.0.1:1883"), BrokerAd("mqtt://x:1", "a")]
    assert choose_broker("z", "mqtt://mine:1883", ads, ["a"]) == "mqtt://mine:1883"


def test_external_broker_preferred_over_hosted() -> None:
    assert choose_broker("z", None, [BrokerAd("mqtt://h:2", "a"), BrokerAd("mqtt://ext:1")], []) == "mqtt://ext:1"


@given(ids, st.data())
def test_all_nodes_converge_on_the_smallest_hosts_broker(nodes: list[str], data) -> None:
    hosts = data.draw(st.lists(st.sampled_from(nodes), min_size=1, unique=True))
    ads = [BrokerAd(f"mqtt://{h}:1", h) for h in hosts]
    choices = {choose_broker(n, None, ads, [m for m in nodes if m != n]) for n in nodes}
    assert choices == {f"mqtt://{min(hosts)}:1"}


@given(ids)
def test_exactly_one_node_hosts_when_there_is_no_broker(nodes: list[str]) -> None:
    choices = [choose_broker(n, None, [], [m for m in nodes if m != n]) for n in nodes]
    assert choices.count("host") == 1
    assert choices[nodes.index(min(nodes))] == "host"
    assert all(c in ("host", None) for c in choices)


def test_broker_url_parsing_and_password_hiding() -> None:
    b = BrokerURL.parse("mqtts://user:p%40ss@broker.lan:8884")
    assert (b.host, b.port, b.tls, b.username, b.password) == ("broker.lan", 8884, True, "user", "p@ss")
    assert "p@ss" not in str(b)
    assert BrokerURL.parse("127.0.0.1:1999").port == 1999
    assert BrokerURL.parse("mqtt://h").port == 1883


def test_membership_expires_silent_members_but_never_itself() -> None:
    m = Membership("me", timeout=1.5)
    assert m.on_record("me", {}, 0.0) and m.on_record("a", {}, 0.0) and m.on_record("b", {}, 0.0)
    m.on_heartbeat("a", 1.0)
    assert m.expire(2.0) == ["b"]
    assert m.expire(10.0) == ["a"]
    assert m.ids == ["me"]


def test_membership_clear_record_removes_at_once() -> None:
    m = Membership("me")
    m.on_record("a", {"x": 1}, 0.0)
    assert m.on_record("a", None, 0.1) is True
    assert m.on_record("a", None, 0.2) is False


def test_election_fences_a_stale_planner() -> None:
    e = Election("b")
    assert e.on_claim("a", 1)
    assert e.accepts_plan(1, "a")
    # a dies; b is next in line and claims term 2
    assert e.should_claim(["b", "c"]) == 2
    e.on_claim("b", 2)
    assert e.leader == "b"
    # a comes back with its old term: its claim and its plans are ignored
    assert not e.on_claim("a", 1)
    assert not e.accepts_plan(1, "a")
    assert e.accepts_plan(2, "b")
    # a plan stamped with a later term is held until that term's claim arrives, never applied before
    assert not e.accepts_plan(9_000_000, "evil") and e.plan_awaits_claim(9_000_000)
    assert not e.plan_awaits_claim(2)
    # a living planner is kept even when a smaller id joins
    assert e.should_claim(["0", "b", "c"]) is None


def test_concurrent_claims_of_one_term_resolve_to_the_smaller_id() -> None:
    for order in (["c", "b"], ["b", "c"]):
        e = Election("x")
        for n in order:
            e.on_claim(n, 3)
        assert e.leader == "b"


@given(ids, st.integers(0, 7))
def test_only_the_smallest_live_node_claims_after_a_failure(nodes: list[str], dead_index: int) -> None:
    dead = nodes[dead_index % len(nodes)]
    alive = [n for n in nodes if n != dead]
    claims = []
    for n in alive:
        e = Election(n)
        e.on_claim(dead, 5)
        if e.should_claim(alive) is not None:
            claims.append(n)
    assert claims == ([min(alive)] if alive else [])
