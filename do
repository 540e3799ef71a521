#!/usr/bin/env bash
# ./do TASK [FLAGS...]
#
# Sets up everything clef-armory needs on a Debian/Ubuntu laptop, then runs `invoke TASK`:
#   1. host packages (installed with apt when run as root or with sudo; otherwise one line naming the command),
#   2. Go >= 1.21 (Clef is built from source; on Debian 12 from bookworm-backports),
#   3. binfmt_misc for armhf (so the ARM root filesystem can be built through qemu-user),
#   4. a Python virtual environment in .venv with this project and its test extra.
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
  sudo gcc libc6-dev  # sudo: build-image as a normal user; gcc: armory-boot-usb (cgo) for flash --emmc
  # The Mk II U-Boot (image/uboot.py): cross compiler, and what U-Boot's build and host tools need.
  gcc-arm-linux-gnueabihf make bison flex bc patch bzip2 pkg-config libssl-dev libgnutls28-dev uuid-dev
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

# Go >= 1.21 builds Clef from source (the default) and armory-boot-usb (flash --emmc); it fetches the
# newer toolchain a module's go.mod asks for by itself. A suitable go already here is used as it is;
# otherwise golang-go from apt: Debian 13 and Ubuntu 24.04 have one, Debian 12's (1.19) is too old,
# so there it comes from bookworm-backports (enabled here, used only for this package).
go_minor_ok() { [[ "$1" =~ ^(go)?([0-9]+)\.([0-9]+) ]] && (( BASH_REMATCH[2] > 1 || BASH_REMATCH[3] >= 21 )); }
go_ok() {
  local g
  for g in "$(command -v go || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
    [ -n "$g" ] && [ -x "$g" ] && go_minor_ok "$(GOTOOLCHAIN=local "$g" env GOVERSION 2>/dev/null)" && return 0
  done
  return 1
}
go_candidate() {  # golang-go's candidate version without its epoch, e.g. 1.23~2~bpo12+1
  local c
  c=$(apt-cache "$@" policy golang-go 2>/dev/null | sed -n 's/^ *Candidate: *//p')
  printf '%s' "${c#*:}"
}
install_go() {  # returns 1 with a reason on stdout when it cannot
  local target=() cand
  [ "$SUDO" = "-" ] && { echo "as root run: apt-get install -y golang-go (Debian 12: enable bookworm-backports and add -t bookworm-backports)"; return 1; }
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || { echo "apt-get update failed"; return 1; }
  if ! go_minor_ok "$(go_candidate)" && [ "$(. /etc/os-release && echo "${VERSION_CODENAME:-}")" = bookworm ]; then
    if ! grep -qsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/*; then
      say "enabling bookworm-backports for Go (bookworm's golang-go 1.19 is too old)"
      printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" "Suites: bookworm-backports" \
        "Components: main" "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" \
        | $SUDO tee /etc/apt/sources.list.d/clef-armory-bookworm-backports.sources >/dev/null
      $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || { echo "apt-get update failed"; return 1; }
    fi
    target=(-t bookworm-backports)
  fi
  cand=$(go_candidate "${target[@]}")
  go_minor_ok "$cand" || { echo "apt offers no Go >= 1.21 (golang-go ${cand:-none}); install Go from go.dev/dl"; return 1; }
  say "installing Go (golang-go $cand)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${target[@]}" golang-go >/dev/null \
    || { echo "could not install it; run: sudo apt-get install -y ${target[*]} golang-go"; return 1; }
  go_ok || { echo "still no Go >= 1.21 after installing golang-go; check: go version"; return 1; }
}
# Without Go only --clef release or path:FILE can build an image: say so, and go on.
if ! go_ok && ! why=$(install_go); then
  say "no Go >= 1.21 (needed to build Clef from source, the default): $why; or use --clef release"
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
