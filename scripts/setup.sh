#!/usr/bin/env bash
# Installs everything wrenn-tui needs on a Debian/Ubuntu machine, idempotently:
# system packages, a virtual environment with the project, and the default capsule image.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PACKAGES=(
  qemu-system-x86 qemu-utils debootstrap busybox-static lz4 kmod e2fsprogs cpio
  ca-certificates debian-archive-keyring python3 python3-venv iproute2 nftables
  umoci skopeo zstd
)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# apt-cache needs fresh lists to find the kernel package the image builder downloads
if [ "${#missing[@]}" -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
  echo "setup: installing system packages: ${missing[*]:-(none; refreshing apt lists)}"
  $SUDO apt-get update -qq
  if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

# QEMU drops to this account when the agent runs as root (backend/runtime/qemu.py: -runas)
if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
  if ! id wrenn-qemu >/dev/null 2>&1; then
    echo "setup: creating the system user wrenn-qemu (QEMU runs as it)"
    $SUDO useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin wrenn-qemu
  fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.wrenn-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing wrenn-tui and its dependencies into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -U pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  echo "$want" > "$stamp"
fi

$SUDO .venv/bin/wrenn-tui image build
