"""lbxdp.model names and the lbxdp.maps helpers that need no kernel."""

from __future__ import annotations

import ctypes
import ipaddress

import pytest

from lbxdp import maps, model
from lbxdp.model import Protocol, VipKey

V4, V6 = ipaddress.IPv4Address, ipaddress.IPv6Address


@pytest.mark.parametrize("key,name", [
    (VipKey(V4("10.0.0.1"), 80, Protocol.TCP), "10.0.0.1:80/tcp"),
    (VipKey(V6("fd00::1"), 80, Protocol.UDP), "[fd00::1]:80/udp"),
    (VipKey(V6("fd00:0:0::1"), 443, Protocol.TCP), "[fd00::1]:443/tcp"),   # compressed form
])
def test_vip_key_name(key: VipKey, name: str) -> None:
    assert key.name == name


def test_backend_name() -> None:
    assert model.Backend(V4("10.0.1.1"), 8080).name == "10.0.1.1:8080"
    assert model.Backend(V6("fd00::11"), 53).name == "[fd00::11]:53"


def test_vip_name_is_its_key_name() -> None:
    vip = model.Vip(V4("10.0.0.1"), 80, Protocol.TCP)
    assert vip.name == vip.key.name == "10.0.0.1:80/tcp"


def test_protocol_numbers() -> None:
    assert (Protocol.TCP.number, Protocol.UDP.number) == (6, 17)


class Pair(ctypes.Structure):
    """A stand-in for a bcc-built map struct."""
    _fields_ = [("addr", ctypes.c_uint8 * 16), ("port", ctypes.c_uint16), ("flags", ctypes.c_uint8)]


def test_make_sets_known_fields() -> None:
    s = maps.make(Pair, addr=b"\x0a\x00\x00\x01", port=80, flags=1)
    assert bytes(s.addr) == b"\x0a\x00\x00\x01" + b"\0" * 12
    assert (s.port, s.flags) == (80, 1)


def test_make_rejects_unknown_field_names() -> None:
    with pytest.raises(TypeError, match=r"Pair has no field\(s\) \['prot'\]"):
        maps.make(Pair, addr=b"", prot=80)


def test_make_does_not_overflow_a_bytes_field() -> None:
    s = maps.make(Pair, addr=b"\xff" * 20, port=7)
    assert bytes(s.addr) == b"\xff" * 16 and s.port == 7


def test_addr_bytes_pads_v4_to_16_bytes() -> None:
    assert maps.addr_bytes(V4("10.0.0.1")) == b"\x0a\x00\x00\x01" + b"\0" * 12
    assert maps.addr_bytes(V6("fd00::1")) == V6("fd00::1").packed
    assert len(maps.addr_bytes(V6("fd00::1"))) == 16


@pytest.mark.parametrize("addr,fam", [(V4("10.0.0.1"), 4), (V6("fd00::1"), 6)])
def test_addr_round_trip(addr: model.IPAddress, fam: int) -> None:
    assert model.family(addr) == fam
    assert maps.addr_from(maps.addr_bytes(addr), fam) == addr


def test_mac_round_trip() -> None:
    assert maps.mac_bytes("02:ab:cd:ef:00:12") == b"\x02\xab\xcd\xef\x00\x12"
    assert maps.mac_str(b"\x02\xab\xcd\xef\x00\x12") == "02:ab:cd:ef:00:12"
