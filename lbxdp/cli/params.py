"""What the CLI's arguments are: VIP and ADDRESS:PORT as click parameter types over the model's
one parser (model.VipKey.parse, model.parse_endpoint), and choices taken from the model's enums.

A bad value is a click usage error (BadValue, exit code 2: CliRunner shows it as one); the
console script (lbxdp.cli.main) prints it as lbxdp's own one-line error with its hint:

    lbxdp: error: VIP '10.0.0.1:80/sctp': 'sctp' is not a protocol; use tcp or udp
      hint: write it like 10.0.0.1:80/tcp or [fd00::1]:53/udp
"""

from __future__ import annotations

import enum
from typing import Any, Iterable

import click

from .. import model
from ..errors import LbxError
from ..model import BackendId


def parse_endpoint(text: str, what: str) -> tuple[model.IPAddress, int]:
    """'10.0.0.1:80', '[fd00::1]:80' or '10.0.0.1:*' (any port) -> (address, port); LbxError
    (exit 2) naming `what` ('backend', 'VIP') otherwise."""
    try:
        return model.parse_endpoint(text)
    except ValueError:
        raise LbxError(f"{what} {text!r} is not ADDRESS:PORT", "write it like 10.0.0.1:80 or [fd00::1]:80",
                       exit_code=2) from None


def parse_vip(text: str) -> model.VipKey:
    """'10.0.0.1:80/tcp' -> VipKey (the same names status and the metrics use); LbxError (exit 2)."""
    try:
        return model.VipKey.parse(text)
    except ValueError as e:
        why = str(e)
    ep, slash, proto = text.rpartition("/")
    if slash and proto in model.Protocol._value2member_map_:
        parse_endpoint(ep, "VIP")   # the protocol is fine, so the endpoint is not: say it in its words
    raise LbxError(f"VIP {text!r}: {why}" if slash else f"VIP {text!r} {why}",
                   "write it like 10.0.0.1:80/tcp or [fd00::1]:53/udp", exit_code=2)


class BadValue(click.BadParameter):
    """A VIP or ADDRESS:PORT that does not parse: a usage error (exit 2) that keeps the LbxError's
    message and hint for lbxdp.cli.main to print."""

    def __init__(self, e: LbxError, ctx: click.Context | None, param: click.Parameter | None):
        super().__init__(e.message, ctx, param)
        self.hint = e.hint


class _Parsed(click.ParamType):
    def parse(self, text: str) -> Any:
        raise NotImplementedError

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value   # a default that is already a value
        try:
            return self.parse(value)
        except LbxError as e:
            raise BadValue(e, ctx, param) from None


class VipType(_Parsed):
    """VIP: ADDR:PORT/PROTO -> model.VipKey."""

    name = "VIP"

    def parse(self, text: str) -> model.VipKey:
        return parse_vip(text)


class EndpointType(_Parsed):
    """ADDR:PORT -> (address, port); `what` names it in the error ('backend')."""

    name = "ADDR:PORT"

    def __init__(self, what: str):
        self.what = what

    def parse(self, text: str) -> tuple[model.IPAddress, int]:
        return parse_endpoint(text, self.what)


VIP = VipType()
BACKEND = EndpointType("backend")


def backend_id(vip: model.VipKey, be: tuple[model.IPAddress, int]) -> BackendId:
    """VIP and BACKEND arguments -> the backend's identity."""
    return BackendId(vip, *be)


class EnumChoice(click.Choice):
    """A choice among an enum's values (or some of them) that converts to the member."""

    def __init__(self, enum_type: type[enum.Enum], only: Iterable[enum.Enum] | None = None):
        self.enum_type = enum_type
        super().__init__([m.value for m in (only if only is not None else enum_type)])

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.enum_type):
            return value
        return self.enum_type(super().convert(value, param, ctx))
