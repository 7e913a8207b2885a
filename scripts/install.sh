#!/usr/bin/env bash
# lbxdp installer: system packages, kernel headers for bcc, bpffs, the venv and the `lbxdp` command.
#
#   bash scripts/install.sh [--no-prometheus]        (as root; or: sudo bash scripts/install.sh)
#
# Supported: Debian 12 (tested) and Ubuntu (best effort), amd64 and arm64.
# Idempotent: a second run changes nothing and only prints "already ..." lines.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash scripts/install.sh [--no-prometheus]   (as root, or with sudo)

  --no-prometheus   do not install Debian's Prometheus server (only some tests use it)
EOF
}

say()  { printf 'install: %s\n' "$*"; }
warn() { printf 'install: WARNING: %s\n' "$*" >&2; }
die()  { printf 'install: ERROR: %s\n' "$*" >&2; exit 1; }

WITH_PROMETHEUS=1
for arg in "$@"; do
    case "$arg" in
        --no-prometheus) WITH_PROMETHEUS=0 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $arg" ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (as root: bash $0; or sudo bash $0)"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
VENV="$REPO/.venv"
SYS_PY=/usr/bin/python3          # Debian's python: the only one that sees python3-bpfcc
STAMP="$VENV/.lbxdp-installed"
KVER=$(uname -r)
MODDIR="/lib/modules/$KVER"

if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
    die "needs a Debian/Ubuntu system (apt-get, dpkg-query not found)"
fi

OS_ID=debian
if [ -r /etc/os-release ]; then
    # shellcheck disable=SC1091
    OS_ID=$(. /etc/os-release && echo "${ID:-debian}")
fi
ARCH=$(dpkg --print-architecture)

# Does /lib/modules/<running kernel>/build resolve to a headers tree bcc can use?
headers_ok() { [ -d "$MODDIR/build/include" ]; }

# ---------------------------------------------------------------- apt packages
# Each entry is "pkg" or "alt1|alt2|...": the first alternative that exists is installed,
# an entry counts as done when any alternative is installed.
PKGS=(python3-bpfcc bpfcc-tools libbpfcc python3-venv python3-pip gcc libc6-dev
      iproute2 ethtool nftables python3-scapy python3-pyroute2 python3-tomli-w tcpdump sudo
      wrk nginx      # wrk, nginx: scripts/bench_e2e_nat.py (keep-alive HTTP through the VIP)
      haproxy        # scripts/bench_e2e.py: HAProxy in TCP mode, a baseline balancer
      python3-rich   # lbxdp top (pyproject: rich)
      python3-yaml   # tests/unit/test_alerts.py reads the alert rules and their promtool tests
      etcd-server etcd-client  # lbxdp run --config etcd://, config push, cluster status; tests/netns/test_etcd.py
      bird2)         # lbxdp run's [bgp] announcer (lbxdp/bgp.py) and the lab router; tests/netns/test_bgp.py
if [ "$OS_ID" = ubuntu ]; then
    PKGS+=("bpftool|linux-tools-$KVER|linux-tools-common")
    HEADERS_PKG="linux-headers-$KVER|linux-headers-generic"
    FLAVOUR=generic
else
    PKGS+=(bpftool)
    # exact match for the running Debian kernel if the archive still has it, else the meta package
    HEADERS_PKG="linux-headers-$KVER|linux-headers-$ARCH"
    FLAVOUR=$ARCH
fi
if headers_ok; then
    HEADERS_PKG=""               # real (or already linked) headers: leave them alone
else
    PKGS+=("$HEADERS_PKG")
fi
if [ "$WITH_PROMETHEUS" = 1 ]; then PKGS+=(prometheus); fi

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}
pkg_available() {
    local cand
    cand=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
    [ -n "$cand" ] && [ "$cand" != "(none)" ]
}

missing=()
for entry in "${PKGS[@]}"; do
    IFS='|' read -r -a alts <<<"$entry"
    done_=0
    for p in "${alts[@]}"; do
        if pkg_installed "$p"; then done_=1; break; fi
    done
    [ "$done_" = 1 ] || missing+=("$entry")
done

new_services=()     # packages *we* install whose services the tests and benchmarks never use
if [ "${#missing[@]}" -eq 0 ]; then
    say "apt packages already installed (${#PKGS[@]} checked)"
else
    export DEBIAN_FRONTEND=noninteractive
    APT_LOG=$(mktemp /tmp/lbxdp-apt.XXXXXX.log)
    APT_OPTS=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)
    say "apt-get update (missing: ${missing[*]//|/ or })"
    if ! apt-get -q -o DPkg::Lock::Timeout=300 update >>"$APT_LOG" 2>&1; then
        warn "apt-get update reported errors (see $APT_LOG); continuing"
    fi
    to_install=()
    for entry in "${missing[@]}"; do
        IFS='|' read -r -a alts <<<"$entry"
        picked=""
        for p in "${alts[@]}"; do
            if pkg_available "$p"; then picked=$p; break; fi
        done
        if [ -n "$picked" ]; then
            to_install+=("$picked")
        else
            warn "no package ${entry//|/ or } in the configured apt sources; skipping it"
        fi
    done
    if [ "${#to_install[@]}" -gt 0 ]; then
        for p in "${to_install[@]}"; do
            case "$p" in prometheus|nginx|haproxy) new_services+=("$p") ;; etcd-server) new_services+=(etcd) ;; bird2) new_services+=(bird) ;; esac
        done
        if ! apt-get install "${APT_OPTS[@]}" "${to_install[@]}" >>"$APT_LOG" 2>&1; then
            tail -n 30 "$APT_LOG" >&2
            die "apt-get install failed (full log: $APT_LOG)"
        fi
        say "apt: installed ${to_install[*]} (log: $APT_LOG)"
    fi
fi

# The prometheus, nginx, haproxy, etcd-server and bird2 packages start their services (nginx and haproxy on the
# host's port 80 / their default config) when systemd runs; the tests and benchmarks start their
# own, inside their own namespaces, so stop each right after *we* installed it (a service that
# was there before is left alone). Without systemd (containers, some VMs) there is nothing to do.
for svc in "${new_services[@]}"; do
    if [ -d /run/systemd/system ] && systemctl is-enabled --quiet "$svc.service" 2>/dev/null; then
        systemctl disable --now --quiet "$svc.service" || warn "could not stop $svc.service"
        say "stopped and disabled $svc.service started by the package (lbxdp's tests run their own)"
    fi
done

# ---------------------------------------------------------------- kernel headers for bcc
if headers_ok; then
    if [ -L "$MODDIR/build" ]; then
        say "kernel headers present: $MODDIR/build -> $(readlink -f "$MODDIR/build")"
    else
        say "kernel headers present at $MODDIR/build"
    fi
else
    # newest /usr/src/linux-headers-<ver>-<flavour> that has include/
    tree=$(for d in /usr/src/linux-headers-*-"$FLAVOUR"; do
               if [ -d "$d/include" ]; then printf '%s\n' "$d"; fi
           done | sort -V | tail -n 1)
    if [ -z "$tree" ]; then
        warn "no kernel headers for $KVER and no /usr/src/linux-headers-*-$FLAVOUR tree to link;" \
             "bcc will not be able to compile the data path (install ${HEADERS_PKG//|/ or } and rerun)"
    elif [ -e "$MODDIR/build" ] && [ ! -L "$MODDIR/build" ]; then
        warn "$MODDIR/build exists but has no include/; not touching it (bcc will likely fail)"
    else
        mkdir -p "$MODDIR"
        ln -sfn "$tree" "$MODDIR/build"
        msg="no headers for $KVER; linked $MODDIR/build -> $tree"
        # the arch-independent half: Debian linux-headers-<abi>-common, Ubuntu linux-headers-<abi>
        src=""
        if [[ "$(basename "$tree")" =~ ^linux-headers-([0-9][^-]*-[0-9]+)- ]]; then
            for s in "/usr/src/linux-headers-${BASH_REMATCH[1]}-common" \
                     "/usr/src/linux-headers-${BASH_REMATCH[1]}"; do
                if [ -d "$s" ]; then src=$s; break; fi
            done
        fi
        if [ -n "$src" ] && { [ -L "$MODDIR/source" ] || [ ! -e "$MODDIR/source" ]; } \
                && [ ! -d "$MODDIR/source/include" ]; then
            ln -sfn "$src" "$MODDIR/source"
            msg="$msg (and source -> $src)"
        fi
        say "$msg"
    fi
fi

# ---------------------------------------------------------------- bpffs
# Mounted 0700 as systemd does (without mode=, bpffs is world-writable). One already mounted is
# left alone, but lbxdp's own directory in it must be root's and 0700: lbxdp refuses it otherwise.
if awk '$2 == "/sys/fs/bpf" && $3 == "bpf" {found=1} END {exit !found}' /proc/mounts; then
    say "bpffs already mounted at /sys/fs/bpf"
else
    mkdir -p /sys/fs/bpf
    mount -t bpf -o mode=0700 bpf /sys/fs/bpf || die "could not mount bpffs at /sys/fs/bpf"
    say "mounted bpffs at /sys/fs/bpf, mode 0700 (not persistent across reboots; rerun this script after one)"
fi
PIN_ROOT=/sys/fs/bpf/lbxdp
if [ -L "$PIN_ROOT" ] || { [ -e "$PIN_ROOT" ] && [ ! -d "$PIN_ROOT" ]; }; then
    die "$PIN_ROOT is not a directory: remove it (rm $PIN_ROOT) and rerun"
elif [ ! -e "$PIN_ROOT" ]; then
    mkdir -m 0700 "$PIN_ROOT"
    say "created $PIN_ROOT (root's, mode 0700)"
elif [ "$(stat -c %u "$PIN_ROOT")" != 0 ]; then
    die "$PIN_ROOT is owned by uid $(stat -c %u "$PIN_ROOT"), not root: remove it (rm -r $PIN_ROOT) if nothing of yours is pinned there, and rerun"
elif [ "$(stat -c %a "$PIN_ROOT")" != 700 ]; then
    chmod 0700 "$PIN_ROOT"
    say "made $PIN_ROOT mode 0700"
else
    say "$PIN_ROOT is root's, mode 0700"
fi

# ---------------------------------------------------------------- venv
[ -x "$SYS_PY" ] || die "$SYS_PY not found (install python3-venv / python3-bpfcc)"
venv_reason=""
if [ ! -x "$VENV/bin/python" ]; then
    venv_reason="missing"
elif [ "$(readlink -f "$VENV/bin/python")" != "$(readlink -f "$SYS_PY")" ]; then
    venv_reason="made from $(readlink -f "$VENV/bin/python"), not $SYS_PY"
elif ! grep -qiE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" 2>/dev/null; then
    venv_reason="made without --system-site-packages (cannot see Debian's bcc)"
elif ! grep -qxF -e "VIRTUAL_ENV=$VENV" -e "VIRTUAL_ENV=\"$VENV\"" -e "VIRTUAL_ENV='$VENV'" \
        "$VENV/bin/activate" 2>/dev/null; then
    venv_reason="created at another path (copied or moved)"
elif ! "$VENV/bin/python" -c '' 2>/dev/null; then
    venv_reason="broken"
fi
if [ -n "$venv_reason" ]; then
    [ "$venv_reason" = missing ] || rm -rf "$VENV"
    "$SYS_PY" -m venv --system-site-packages "$VENV" \
        || die "'$SYS_PY -m venv' failed (is python3-venv installed?)"
    rm -f "$STAMP"
    say "created $VENV with $SYS_PY --system-site-packages (.venv: $venv_reason)"
else
    say "venv already at $VENV ($SYS_PY, system site packages)"
fi

# Is lbxdp installed (editable, from this checkout) at pyproject's version? Checked without
# importing lbxdp, so half-written code elsewhere in the package does not force a reinstall.
want_version=$("$SYS_PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$REPO/pyproject.toml") || die "cannot read project.version from $REPO/pyproject.toml"
have=$(cd / && "$VENV/bin/python" -I -c '
import importlib.metadata as md, importlib.util as iu
try:
    v = md.version("lbxdp")
except md.PackageNotFoundError:
    v = "-"
s = iu.find_spec("lbxdp")
print(v, s.origin if s and s.origin else "-")' 2>/dev/null || echo "- -")
if [ "$have" = "$want_version $REPO/lbxdp/__init__.py" ] && [ -f "$STAMP" ] \
        && [ ! "$REPO/pyproject.toml" -nt "$STAMP" ]; then
    say "lbxdp $want_version already installed in the venv (editable)"
else
    [ -f "$REPO/lbxdp/__init__.py" ] || die "$REPO/lbxdp/__init__.py is missing; cannot install the package"
    readme=$("$SYS_PY" -c 'import sys, tomllib; r = tomllib.load(open(sys.argv[1], "rb"))["project"].get("readme", ""); print(r if isinstance(r, str) else r.get("file", ""))' \
        "$REPO/pyproject.toml")
    if [ -n "$readme" ] && [ ! -f "$REPO/$readme" ]; then
        die "pyproject.toml names readme '$readme', which is missing: the package cannot be built"
    fi
    PIP_LOG=$(mktemp /tmp/lbxdp-pip.XXXXXX.log)
    if ! (cd "$REPO" && PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
            "$VENV/bin/python" -m pip install --quiet -e '.[test]') >"$PIP_LOG" 2>&1; then
        cat "$PIP_LOG" >&2
        die "pip install -e '.[test]' failed (log: $PIP_LOG)"
    fi
    rm -f "$PIP_LOG"
    printf '%s %s\n' "$want_version" "$REPO" >"$STAMP"
    say "pip installed lbxdp $want_version (editable) with test extras into the venv"
fi

# ---------------------------------------------------------------- C helper for Maglev tables
# lbxdp/_ring.c builds a 65537-slot table in ~1 ms (Python: ~13 ms); without it lbxdp still works.
if (cd / && "$VENV/bin/python" -I -m lbxdp.ring status >/dev/null 2>&1); then
    say "Maglev table helper already built"
elif out=$(cd / && "$VENV/bin/python" -I -m lbxdp.ring build 2>&1); then
    say "built the Maglev table helper ($(printf '%s\n' "$out" | head -n1))"
else
    warn "could not build the Maglev table helper; tables are built in Python, 15-20x slower: $out"
fi

# ---------------------------------------------------------------- /usr/local/bin/lbxdp
LINK=/usr/local/bin/lbxdp
TARGET="$VENV/bin/lbxdp"
if [ ! -x "$TARGET" ]; then
    warn "$TARGET does not exist (no [project.scripts] entry?); not linking $LINK"
elif [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$TARGET" ]; then
    say "$LINK already -> $TARGET"
elif [ -L "$LINK" ] && [ ! -e "$LINK" ]; then
    ln -sfn "$TARGET" "$LINK"
    say "replaced dangling $LINK; now -> $TARGET"
elif [ -e "$LINK" ] || [ -L "$LINK" ]; then
    if [ -L "$LINK" ]; then
        warn "$LINK already -> $(readlink "$LINK"); leaving it (rm it and rerun to use this checkout)"
    else
        warn "$LINK exists and is not our symlink; leaving it (use $TARGET)"
    fi
else
    mkdir -p /usr/local/bin
    ln -s "$TARGET" "$LINK"
    say "linked $LINK -> $TARGET (so 'sudo lbxdp ...' works)"
fi

# ---------------------------------------------------------------- verify
fail=0
check_out=$(cd / && "$VENV/bin/python" -I - <<'EOF' 2>&1
import importlib, sys
bad = 0
for name in ("bcc", "lbxdp", "pyroute2", "click", "prometheus_client", "scapy", "aioquic"):
    try:
        mod = importlib.import_module(name)
    except BaseException as e:  # report every failure, keep going
        print(f"FAIL {name}: {type(e).__name__}: {e}")
        bad = 1
        continue
    if name == "bcc" and not (mod.__file__ or "").startswith("/usr/lib/python3/dist-packages/"):
        print(f"FAIL bcc: imported from {mod.__file__}, not Debian's python3-bpfcc "
              "(the PyPI package 'bcc' is unrelated: .venv/bin/pip uninstall bcc)")
        bad = 1
sys.exit(bad)
EOF
) || fail=1
if [ "$fail" = 1 ]; then
    printf '%s\n' "$check_out" | sed 's/^/install:   /' >&2
    if printf '%s\n' "$check_out" | grep -q '^FAIL bcc'; then
        if [ ! -d /usr/lib/python3/dist-packages/bcc ]; then
            warn "bcc: Debian's python3-bpfcc is not installed (apt-get install python3-bpfcc libbpfcc)"
        elif printf '%s\n' "$check_out" | grep -q 'libbcc'; then
            warn "bcc: the bcc library cannot be loaded (apt-get install --reinstall libbpfcc)"
        else
            warn "bcc: the venv must be made from $SYS_PY with --system-site-packages (rm -rf $VENV and rerun)"
        fi
    fi
    if printf '%s\n' "$check_out" | grep -q '^FAIL lbxdp'; then
        warn "lbxdp itself does not import: that is a bug in the package code, not in the install"
    fi
    die "the venv cannot import everything lbxdp needs (see above)"
fi

# bcc needs kernel headers and a kernel that accepts XDP programs: compile and load (not attach)
# a trivial one. Nothing is left behind: the program is freed when python exits.
if bcc_out=$(cd / && "$VENV/bin/python" -I -c '
from bcc import BPF
b = BPF(text="int lbxdp_install_check(struct xdp_md *ctx) { return XDP_PASS; }")
b.load_func("lbxdp_install_check", BPF.XDP)' 2>&1); then
    say "bcc compiled and loaded a test XDP program"
else
    printf '%s\n' "$bcc_out" | tail -n 15 | sed 's/^/install:   /' >&2
    if ! headers_ok; then
        die "bcc cannot compile: no kernel headers at $MODDIR/build (install ${HEADERS_PKG//|/ or } and rerun)"
    fi
    die "bcc could not compile/load a trivial XDP program (see above; needs root and a kernel with BPF)"
fi

if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$TARGET" ]; then
    say "ok — run as root: lbxdp demo   (tests: cd $REPO && .venv/bin/python -m pytest tests; prefix sudo if not root)"
else
    say "ok — run as root: cd $REPO && .venv/bin/lbxdp demo   (tests: .venv/bin/python -m pytest tests; prefix sudo if not root)"
fi
