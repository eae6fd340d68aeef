"""Pure parts of the stream receiver: listen URLs, VSOCK identity, limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_trio.core.identity import check_identity, check_peer_cid
from relay_trio.core.ids import is_valid_resource_id
from relay_trio.core.listen import ListenAddress, parse_listen
from relay_trio.stream.receiver import ReceiverLimits


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:9000", ListenAddress("tcp", host="127.0.0.1", port=9000)),
        ("tcp://0.0.0.0:0", ListenAddress("tcp", host="0.0.0.0", port=0)),
        ("TCP://localhost:65535", ListenAddress("tcp", host="localhost", port=65535)),
        ("tcp://[::1]:8080", ListenAddress("tcp", host="::1", port=8080)),
        ("tcp://[fe80::1%eth0]:1", ListenAddress("tcp", host="fe80::1%eth0", port=1)),
        ("unix:///run/relay/agent.sock", ListenAddress("unix", path="/run/relay/agent.sock")),
        ("vsock://any:1024", ListenAddress("vsock", cid=-1, port=1024)),
        ("vsock://-1:1024", ListenAddress("vsock", cid=-1, port=1024)),
        ("vsock://4294967295:1024", ListenAddress("vsock", cid=-1, port=1024)),
        ("vsock://3:5000", ListenAddress("vsock", cid=3, port=5000)),
        ("vsock://ANY:any", ListenAddress("vsock", cid=-1, port=-1)),
    ],
)
def test_parse_listen_accepts(url: str, expected: ListenAddress) -> None:
    assert parse_listen(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:9000", "missing scheme"),
        ("http://127.0.0.1:80", "unknown scheme 'http'"),
        ("tcp://127.0.0.1", "expected HOST:PORT"),
        ("tcp://:9000", "expected HOST:PORT"),
        ("tcp://127.0.0.1:", "expected HOST:PORT"),
        ("tcp://127.0.0.1:65536", "not in 0..65535"),
        ("tcp://127.0.0.1:-1", "not in 0..65535"),
        ("tcp://127.0.0.1:80x", "is not an integer"),
        ("tcp://127.0.0.1:+80", "is not an integer"),
        ("tcp://127.0.0.1:٨٠", "is not an integer"),
        ("tcp://::1:80", "must be in brackets"),
        ("tcp://[nope]:80", "bad IPv6 host"),
        ("tcp://user@host:80", "only HOST:PORT"),
        ("tcp://host:80/path", "only HOST:PORT"),
        ("tcp://ho st:80", "only HOST:PORT"),
        ("tcp://h_$t:80", "bad host"),
        ("unix://relative.sock", "must be absolute"),
        ("unix://", "must be absolute"),
        ("unix:///tmp/dir/", "bad unix socket path"),
        ("unix:///" + "x" * 200, "longer than 107 bytes"),
        ("vsock://3", "expected HOST:PORT"),
        ("vsock://three:1024", "CID 'three' is not an integer"),
        ("vsock://-2:1024", "CID -2 not in"),
        ("vsock://3:4294967296", "port 4294967296 not in"),
    ],
)
def test_parse_listen_rejects_with_clear_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="listen address") as info:
        parse_listen(url)
    assert message in str(info.value)


def _addresses() -> st.SearchStrategy[ListenAddress]:
    tcp = st.builds(
        lambda host, port: ListenAddress("tcp", host=host, port=port),
        st.sampled_from(["127.0.0.1", "0.0.0.0", "::", "::1", "localhost", "relay.internal"]),
        st.integers(0, 65535),
    )
    unix = st.builds(
        lambda name: ListenAddress("unix", path=f"/run/{name}.sock"),
        st.text("abcxyz_-.0123456789", min_size=1, max_size=40),
    )
    vsock = st.builds(
        lambda cid, port: ListenAddress("vsock", cid=cid, port=port),
        st.integers(-1, 0xFFFFFFFE),
        st.integers(-1, 0xFFFFFFFE),
    )
    return st.one_of(tcp, unix, vsock)


@settings(max_examples=200, deadline=None)
@given(_addresses())
def test_url_round_trips(address: ListenAddress) -> None:
    assert parse_listen(address.url) == address


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_listen_only_raises_value_error(url: str) -> None:
    try:
        address = parse_listen(url)
    except ValueError as exc:
        assert "listen address" in str(exc)
    else:
        assert parse_listen(address.url) == address


@pytest.mark.parametrize(
    ("resource_id", "cid", "allowed"),
    [
        ("100", 100, True),
        ("vm-1:100", 100, True),
        ("tenant:vm-1:100", 100, True),
        ("vm-1:1100", 100, False),  # suffix match needs the colon
        ("1100", 100, False),
        ("vm-1:10", 100, False),
        ("vm-1", 100, False),
        ("100:vm-1", 100, False),
        ("vm-1:100:", 100, False),
        ("", 3, False),
    ],
)
def test_check_identity(resource_id: str, cid: int, allowed: bool) -> None:
    problem = check_identity(resource_id, cid)
    if allowed:
        assert problem is None
    else:
        assert problem is not None
        assert problem.status == 403
        assert problem.slug == "identity-mismatch"
        assert str(cid) in problem.detail
        assert problem.to_dict()["cid"] == cid


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.from_regex(r"[A-Za-z0-9._-]{0,20}", fullmatch=True),
    cid=st.integers(3, 0xFFFFFFFE),
    other=st.integers(3, 0xFFFFFFFE),
)
def test_a_guest_cannot_claim_another_guests_resource(prefix: str, cid: int, other: int) -> None:
    rid = f"{prefix}:{cid}" if prefix else str(cid)
    assert is_valid_resource_id(rid)
    assert check_identity(rid, cid) is None
    if other != cid:
        assert check_identity(rid, other) is not None


@pytest.mark.parametrize("cid", [0, 1, 2, -1])
def test_host_and_hypervisor_cids_are_not_peers(cid: int) -> None:
    problem = check_peer_cid(cid)
    assert problem is not None
    assert (problem.status, problem.slug) == (403, "peer-not-allowed")


@pytest.mark.parametrize("cid", [3, 100, 0xFFFFFFFE])
def test_guest_cids_are_peers(cid: int) -> None:
    assert check_peer_cid(cid) is None


def test_limits_defaults() -> None:
    limits = ReceiverLimits()
    assert (limits.max_connections, limits.slot_wait, limits.idle_timeout) == (50, 5.0, 10.0)
    assert (limits.max_frame, limits.read_chunk) == (16 * 1024 * 1024, 64 * 1024)


@pytest.mark.parametrize(
    "field", ["max_connections", "slot_wait", "idle_timeout", "max_frame", "read_chunk"]
)
@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan")])
def test_limits_reject_non_positive(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        ReceiverLimits(**{field: value})  # type: ignore[arg-type]
