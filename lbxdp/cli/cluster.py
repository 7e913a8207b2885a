"""Shared config in etcd (lbxdp.etcdsrc): `lbxdp config push`, `lbxdp cluster status`."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from .common import print_warnings
from .instance import config_group


@config_group.command("push")
@click.argument("path", type=click.Path(dir_okay=False))
@click.argument("url", metavar="etcd://HOST:PORT/PREFIX")
@click.option("--if-revision", type=click.IntRange(0), metavar="N", help="Write only if the config there is "
              "still at revision N (0: there is none yet); default: the revision read just before writing.")
@click.pass_context
def config_push(ctx: click.Context, path: str, url: str, if_revision: int | None) -> None:
    """Validate PATH, then write it to PREFIX/config in etcd for every `lbxdp run --config URL`.

    A file that does not validate is refused (exit 2) and nothing is written. The write is a
    compare-and-swap on the revision read before it, so two pushes at once cannot both win.

    \b
    Example: lbxdp config push lb.toml etcd://10.0.0.5:2379/lbxdp
    """
    from .. import config, etcdsrc
    from ..errors import LbxError
    u = etcdsrc.EtcdUrl.parse(url)
    text = config.read_text(path)
    cfg = config.parse(text, source=path)
    print_warnings(config.warnings(cfg))
    netns = (ctx.obj or {}).get("netns")
    if netns:   # `lbxdp --netns NAME config ...` does not enter it for `config check`; push talks from there
        from pyroute2 import netns as pr_netns
        pr_netns.setns(netns, flags=0)
    client = etcdsrc.Client(u)
    kv = client.get(u.config_key)
    have = kv.mod_revision if kv else 0
    if if_revision is not None and if_revision != have:
        raise LbxError(f"the config at {u} is at revision {have}, not {if_revision}: nothing was written",
                       f"look at it (lbxdp cluster status {u}) and push again", exit_code=3)
    if kv is not None and kv.value == text.encode():
        click.echo(f"{u}: unchanged, revision {have}")
        return
    ok, rev = client.put_if(u.config_key, text.encode(), have)
    if not ok:
        raise LbxError(f"the config at {u} changed while pushing (another push?): nothing was written",
                       f"look at it (lbxdp cluster status {u}) and push again", exit_code=3)
    click.echo(f"{u}: pushed {path} as revision {rev} ({len(cfg.vips)} VIPs)")


@click.group("cluster")
def cluster() -> None:
    """Nodes sharing a config in etcd (`lbxdp run --config etcd://...`)."""


def _nodes(url: Any) -> tuple[int, list[dict[str, Any]]]:
    from .. import etcdsrc
    client = etcdsrc.Client(url)
    kv = client.get(url.config_key)
    nodes = []
    for n in client.prefix(url.nodes_prefix):
        try:
            doc = json.loads(n.value)
        except ValueError:
            doc = {"node": n.key.removeprefix(url.nodes_prefix), "error": "unreadable record"}
        doc.setdefault("node", n.key.removeprefix(url.nodes_prefix))
        nodes.append(doc)
    return (kv.mod_revision if kv else 0), sorted(nodes, key=lambda d: str(d.get("node")))


def cluster_doc(url: Any) -> dict[str, Any]:
    """What `cluster status --json` prints: the config's revision, each node with its applied
    revision and table tags, and, per VIP, whether every node's tag is the same."""
    rev, nodes = _nodes(url)
    vips = sorted({v for n in nodes for v in (n.get("table_tags") or {})})
    agree = {}
    for v in vips:
        tags = {(n.get("table_tags") or {}).get(v) for n in nodes}
        agree[v] = len(tags) == 1
    for n in nodes:
        n["current"] = n.get("applied_revision") == rev
    return {"source": str(url), "revision": rev, "nodes": nodes, "tags_equal": agree,
            "converged": bool(nodes) and all(n["current"] for n in nodes) and all(agree.values())}


@cluster.command("status")
@click.argument("url", metavar="etcd://HOST:PORT/PREFIX")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cluster_status(url: str, as_json: bool) -> None:
    """The nodes registered under PREFIX/nodes/: applied revision, table tags, announcements.

    A tag is a digest of the VIP's table as backends (slot by slot): equal tags on every node
    mean that every node sends a new flow to the same backend. `*` marks a tag that differs
    from another node's; `refused` a revision a node did not take (and why).
    """
    from .. import etcdsrc
    u = etcdsrc.EtcdUrl.parse(url)
    doc = cluster_doc(u)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{u}: config revision {doc['revision'] or 'none'}, {len(doc['nodes'])} nodes"
               + (", converged" if doc["converged"] else ", NOT converged" if doc["nodes"] else ""))
    for n in doc["nodes"]:
        age = f", updated {max(0.0, time.time() - n['updated']):.0f}s ago" if n.get("updated") else ""
        click.echo(f"  {n['node']}: applied revision {n.get('applied_revision')}"
                   + ("" if n["current"] else " (behind)") + age)
        if n.get("refused"):
            r = n["refused"]
            click.echo(f"    refused revision {r.get('revision')}: {r.get('reason')}")
        for v, tag in sorted((n.get("table_tags") or {}).items()):
            mark = "" if doc["tags_equal"].get(v) else " *"
            click.echo(f"    {v:<34} table {tag}{mark}")
        if n.get("announcements") is not None:
            ann = n["announcements"]
            text = ", ".join(f"{k} {v}" for k, v in sorted(ann.items())) if isinstance(ann, dict) else str(ann)
            click.echo(f"    announcements: {text}")


COMMANDS = (cluster,)
