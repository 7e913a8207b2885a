"""lbxdp configs for a rig, built as model values and written by lbxdp.config.dump: the lab never
writes TOML by hand, so a config it hands the balancer is one the model accepts and the parser
reads back to the same model.

Configs is a mixin of lbxdp.lab.rig.Rig (it uses spec, backends, addr4/addr6 and mac).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from .. import config, model
from ..health import HealthCheck


def _vip_field(name: str, value: Any) -> Any:
    """A Vip field's value in the field's own type (an enum where the model has one), so callers
    can say on_backend_down="migrate" whatever type the model gives that field."""
    default = next(f.default for f in dataclasses.fields(model.Vip) if f.name == name)
    return type(default)(value) if isinstance(default, enum.Enum) else value


def dump(*vips: model.Vip) -> str:
    """A config file holding these VIPs."""
    return config.dump(model.Config(vips=tuple(vips)))


class Configs:
    """Config builders as methods of a rig (mixin; see the module docstring)."""

    def backend(self, role: str, version: int = 4, *, with_mac: bool = False, weight: int = 1,
                backup: bool = False) -> model.Backend:
        """Backend `role` of the rig's VIP of this family (with its real MAC if with_mac; without,
        the control plane finds it in lb's neighbour table, see RigSpec.lb_neighbors)."""
        addr = self.addr4(role) if version == 4 else self.addr6(role)
        return model.Backend(address=addr, port=self.spec.port, mac=self.mac(role) if with_mac else None,
                             weight=weight, backup=backup)

    def vip(self, version: int = 4, proto: str = "tcp", backends: list[str] | None = None, *,
            scheduler: str = "maglev", weights: dict[str, int] | None = None,
            backup: tuple[str, ...] | list[str] = (), with_mac: bool = False,
            health: HealthCheck | None = None, **fields: Any) -> model.Vip:
        """The rig's VIP of this family and protocol (DSR) with these backend roles (default: all),
        weights (default 1), backups and health check; `fields` sets other Vip fields
        (on_backend_down="migrate", on_all_down="pass", ...)."""
        roles = self.backends if backends is None else backends
        bes = tuple(self.backend(r, version, with_mac=with_mac, weight=(weights or {}).get(r, 1),
                                 backup=r in backup) for r in roles)
        return model.Vip(address=self.spec.vip4 if version == 4 else self.spec.vip6, port=self.spec.port,
                         protocol=model.Protocol(proto), scheduler=model.Scheduler(scheduler), backends=bes,
                         health=health, **{k: _vip_field(k, v) for k, v in fields.items()})

    def vip_toml(self, version: int = 4, proto: str = "tcp", backends: list[str] | None = None,
                 **kw: Any) -> str:
        """A config file with the one VIP that vip() describes (same arguments)."""
        return dump(self.vip(version, proto, backends, **kw))

    def lb_config(self, scheduler: str = "rr", with_mac: bool = True, **kw: Any) -> model.Config:
        """DSR VIPs v4 tcp, v4 udp, v6 tcp, v6 udp, each with every backend."""
        return model.Config(vips=tuple(self.vip(v, p, scheduler=scheduler, with_mac=with_mac, **kw)
                                       for v in (4, 6) for p in ("tcp", "udp")))

    def lb_config_toml(self, scheduler: str = "rr", with_mac: bool = True, **kw: Any) -> str:
        """lb_config() as a config file."""
        return config.dump(self.lb_config(scheduler, with_mac, **kw))

    def nat_vip(self, version: int = 4, proto: str = "tcp", backends: list[str] | None = None, *,
                port: int | None = None, backend_port: int | None = None, snat: bool = False,
                scheduler: str = "rr", **fields: Any) -> model.Vip:
        """A NAT VIP (issue 12) of this family and protocol on `port` (default: the rig's port)
        with these backend roles (default: all) on `backend_port` (default: the rig's port, where
        the echo servers listen): port translation when the two differ. snat: full NAT (source
        becomes the balancer's address, [balancer] snat_v4/v6 and snat_ports: nat_config())."""
        roles = self.backends if backends is None else backends
        bes = tuple(model.Backend(address=self.addr4(r) if version == 4 else self.addr6(r),
                                  port=backend_port or self.spec.port) for r in roles)
        return model.Vip(address=self.spec.vip4 if version == 4 else self.spec.vip6,
                         port=port or self.spec.port, protocol=model.Protocol(proto), mode=model.Mode.NAT,
                         scheduler=model.Scheduler(scheduler), backends=bes, snat=snat,
                         **{k: _vip_field(k, v) for k, v in fields.items()})

    def nat_config_toml(self, *vips: model.Vip, **balancer: Any) -> str:
        """A config file with these VIPs and [balancer] options (snat_v4, snat_ports=(lo, hi),
        nat_timeouts=model.NatTimeouts(...), ...)."""
        return config.dump(model.Config(vips=tuple(vips), balancer=model.BalancerOptions(**balancer)))

    def endpoint(self, role: str, version: int = 4) -> str:
        """A backend as lbxdp names it: '10.111.0.11:8080' or '[fd00:111::11]:8080'."""
        return self.backend(role, version).name

    def role_of(self, endpoint: str) -> str:
        """The backend role of an lbxdp backend name (the inverse of endpoint())."""
        for role in self.backends:
            if endpoint in (self.endpoint(role, 4), self.endpoint(role, 6)):
                return role
        raise KeyError(f"{endpoint!r} is no backend of rig {self.spec.prefix}")

    def vip_name(self, version: int = 4, proto: str = "tcp") -> str:
        """A VIP as lbxdp names it: '10.112.0.10:8080/tcp' or '[fd00:112::10]:8080/udp'."""
        return model.VipKey(self.spec.vip4 if version == 4 else self.spec.vip6, self.spec.port,
                            model.Protocol(proto)).name
