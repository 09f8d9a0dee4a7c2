#!/usr/bin/env bash
# One-shot set-up of a fresh Debian 12 host (as root): system packages, tracefs, and a virtual
# environment in .venv that sees Debian's bcc and has keytrace installed (editable).
set -euo pipefail
cd "$(dirname "$0")"

need=(python3-bpfcc libbpfcc bpfcc-tools python3-venv gcc libc6-dev bpftool)
# Test fixtures on other C libraries: a musl program (musl-gcc) and static glibc ones; and PHP's
# CLI, a real program that dlopens its extensions, for the healthy-host test.
need+=(musl-tools php-cli)
# keytrace calls against its models: a C++ program for -C (g++), and strace beside -S.
need+=(g++ strace)
# promtool, for the alert rules' unit tests (Debian ships it in the server package), and an
# Alertmanager, which the delivery test sends a real alert through.
need+=(prometheus prometheus-alertmanager)
# The agent's container image, built offline from a Debian rootfs and run with the host's PID
# namespace (runc: crun fails on these hosts' hybrid cgroups).
need+=(podman runc mmdebstrap)
# The incident's own stack, for the verdict tests: Debian's stock Apache with mod_php and Imagick
# (their services are kept off: the tests start their own), and curl, an OpenSSL client.
need+=(apache2 libapache2-mod-php php-imagick curl)
# For bench/ only: the tools keytrace is measured against, GNU time for peak memory, and the
# call-heavy programs bench/calls.py counts (sort is coreutils).
need+=(bpftrace ltrace time git sqlite3)
# Distribution kernel headers: keytrace merges them into a tree bcc accepts when the running
# kernel ships none (cloud kernels, this VM).
need+=(linux-headers-amd64)
missing=()
for p in "${need[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -q
  # No service starts while the packages install: the tests start their own servers. The
  # policy file goes whatever happens (left behind, it would keep every service from starting).
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    trap 'rm -f "$policy"' EXIT
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Servers installed just now (not ones the host already ran) stay off.
  for svc in prometheus prometheus-alertmanager apache2; do
    if [[ " ${missing[*]} " == *" $svc "* ]]; then
      systemctl disable "$svc" >/dev/null 2>&1 || true
      systemctl stop "$svc" >/dev/null 2>&1 || true
    fi
  done
fi

mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing || true

# bcc is importable only from Debian's /usr/bin/python3, hence the system interpreter.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c 'import bcc' || { echo "setup: bcc is not importable from .venv" >&2; exit 1; }
