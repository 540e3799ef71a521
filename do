#!/usr/bin/env bash
# ./do TASK [FLAGS...]
#
# Sets up everything clef-armory needs on a Debian/Ubuntu laptop, then runs `invoke TASK`:
#   1. host packages (installed with apt when run as root or with sudo; otherwise one line naming the command),
#   2. binfmt_misc for armhf (so the ARM root filesystem can be built through qemu-user),
#   3. a Python virtual environment in .venv with this project and its test extra.
# Every step is idempotent; a second run only checks.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

say() { printf 'clef-armory: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

HOST_PACKAGES=(
  python3 python3-venv python3-pip git ca-certificates
  mmdebstrap qemu-user-static binfmt-support arch-test
  e2fsprogs fdisk bmap-tools gnupg zstd xz-utils
  device-tree-compiler u-boot-tools cpp debian-archive-keyring
  qemu-system-arm qemu-utils openssh-client openssh-server nftables iproute2 util-linux graphviz
)

if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="-"; fi

missing=()
for p in "${HOST_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js and npm (the ethers.js client tests) may come from Debian or from elsewhere: check the commands.
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$SUDO" = "-" ] && die "missing host packages; run as root: apt-get install -y ${missing[*]}"
  say "installing host packages: ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
    || die "apt-get update failed; run: sudo apt-get update"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "could not install host packages; run: sudo apt-get install -y ${missing[*]}"
fi

# binfmt_misc for armhf: mmdebstrap runs the ARM root filesystem's maintainer scripts through qemu-arm.
if ! arch-test armhf >/dev/null 2>&1; then
  [ "$SUDO" = "-" ] && die "armhf binaries cannot run here; as root run: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-arm"
  if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
    $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
  fi
  $SUDO update-binfmts --enable qemu-arm >/dev/null 2>&1 || true
  arch-test armhf >/dev/null 2>&1 \
    || die "armhf binaries still cannot run; check: arch-test armhf (needs binfmt_misc and qemu-user-static)"
  say "enabled qemu-arm in binfmt_misc"
fi

# Python environment: rebuilt only when pyproject.toml changes.
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python 3.11 or newer is needed; $($PY --version 2>&1) found"
stamp=".venv/.clef-armory-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  say "setting up the Python environment in .venv"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv || die "could not create .venv; run: sudo apt-get install -y python3-venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null || die "pip upgrade failed (is PyPI reachable?)"
  .venv/bin/python -m pip install -q -e '.[test]' || die "could not install Python dependencies (is PyPI reachable?)"
  rm -f .venv/.clef-armory-*; touch "$stamp"
fi

[ "$#" -gt 0 ] || set -- --list
exec .venv/bin/invoke "$@"
