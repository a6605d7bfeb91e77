#!/usr/bin/env bash
# Sallyport's whole test suite, on a fresh Debian 12 machine: installs the real components the
# tests drive (OpenSSH server and client, curl ...) when they are missing, checks formatting and
# lints, then runs every test. Usage: scripts/test.sh [extra cargo-nextest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need, as "command-or-path:package".
needs=(
  "/usr/sbin/sshd:openssh-server"
  "sftp:openssh-client"
  "ssh-keygen:openssh-client"
  "curl:curl"
  "useradd:passwd"
  "strace:strace"
  "/usr/sbin/nginx:nginx-light"
  "/usr/sbin/vsftpd:vsftpd"
  "lftp:lftp"
  "promtool:prometheus"
  "/usr/sbin/nft:nftables"
  "/usr/sbin/ip:iproute2"
  "systemd-analyze:systemd"
  "/usr/sbin/haproxy:haproxy"
  "/bin/nc.openbsd:netcat-openbsd"
  "setpriv:util-linux"
  "/usr/bin/chromium:chromium"
  "node:nodejs"
  "npm:npm"
)
missing=()
for pair in "${needs[@]}"; do
  cmd=${pair%%:*} pkg=${pair#*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "$cmd" ]; then
    [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  echo "scripts/test.sh: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# playwright-core for the dashboard test (tests/dashboard.rs), pinned by package-lock.json.
if [ ! -d tests/dashboard/node_modules ]; then
  npm ci --prefix tests/dashboard --no-audit --no-fund
fi

cargo fmt --check
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --all-targets --quiet -- -D warnings
fi
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test "$@"
fi

# The benchmark's smoke mode: every variant (direct, rathole, sallyport plain and TLS) moves
# bytes through iperf3, wrk and the connection tests with no errors; no timing is judged.
# About a minute, plus installing iperf3/wrk and building rathole once on a fresh machine.
# Skipped when extra arguments select particular tests, or with SALLYPORT_SKIP_BENCH=1.
if [ $# -eq 0 ] && [ -z "${SALLYPORT_SKIP_BENCH:-}" ]; then
  bench/run --smoke
fi
