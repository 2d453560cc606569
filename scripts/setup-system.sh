#!/usr/bin/env bash
# Installs and starts what mecsplit's emulated testbed needs: Docker engine, Mininet (Linux-bridge
# switches), iproute2/tc, iptables, NFQUEUE headers (delay/loss where the kernel lacks netem), Chromium
# (UI tests). Idempotent. Without root it only reports what is missing: the local backend still works.
set -euo pipefail

PKGS=(docker.io mininet bridge-utils iproute2 iptables libnetfilter-queue-dev iperf3 chromium psmisc)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-system: not root; skipping Docker/Mininet setup (run 'mecsplit testbed doctor' for details)."
  exit 0
fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-system: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Docker engine: started in the background if no daemon answers.
if ! docker info >/dev/null 2>&1; then
  echo "setup-system: starting dockerd"
  mkdir -p /var/log
  setsid nohup dockerd >/var/log/mecsplit-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "setup-system: dockerd did not start; see /var/log/mecsplit-dockerd.log" >&2; exit 1; }
fi
echo "setup-system: ok (docker $(docker version -f '{{.Server.Version}}' 2>/dev/null), $(mn --version 2>/dev/null | head -1 | sed 's/^/mininet /'))"
