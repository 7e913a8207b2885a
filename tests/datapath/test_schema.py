"""The map types lbxdp decodes itself (bpfsys.ctype_from_desc) are the ones bcc builds.

Processes that only read maps (status, the exporter) decode bcc's saved type description
without importing bcc; this checks, map by map, that the result has bcc's size and every
field at bcc's offset, on the program compiled for this session.
"""

from __future__ import annotations

import ctypes

import pytest

from lbxdp import abi, bpfsys, loader

from .harness import Lb


def layout(t: type, prefix: str = "") -> list[tuple[str, int, int]]:
    """(field path, offset, size) of every field, nested structs and arrays flattened by name."""
    out = [(prefix or "<self>", 0, ctypes.sizeof(t))]
    for f in getattr(t, "_fields_", []):
        name, ftype = f[0], f[1]
        desc = getattr(t, name)
        out += [(p, o + desc.offset, s) for p, o, s in layout(ftype, f"{prefix}{name}.")]
    return out


@pytest.mark.parametrize("name", [m.value for m in abi.Map])
def test_decoded_types_match_bcc(compiled_lb: Lb, name: str) -> None:
    table = compiled_lb.prog.bpf.get_table(name.encode())
    desc = compiled_lb.prog.schema[name]
    bcc_leaf = getattr(table, "sLeaf", table.Leaf)   # per-CPU tables: bcc's per-CPU element
    assert layout(bpfsys.ctype_from_desc(desc["key"])) == layout(table.Key)
    leaf = bpfsys.ctype_from_desc(desc["leaf"])
    if name == abi.Map.MBT_TMPL:
        # bcc is shown a one-word value (bpf/maps.h says why); the schema describes the blob
        # the loader created, the kernel's value size: the same field, as long as the map's value.
        assert ctypes.sizeof(leaf) == compiled_lb.prog.maps[name].info.value_size == loader.ACL_BLOB_BYTES
        assert layout(leaf)[1][:2] == layout(bcc_leaf)[1][:2] == ("w.", 0)
        return
    assert layout(leaf) == layout(bcc_leaf)
