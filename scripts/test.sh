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
  # tests/deb.rs: build, install, read and remove the Debian package
  "dpkg-deb:dpkg"
  "dpkg-shlibdeps:dpkg-dev"
  "objcopy:binutils"
  "gzip:gzip"
  "flock:util-linux"
  "man:man-db"
  "/usr/share/bash-completion/bash_completion:bash-completion"
  "zsh:zsh"
  "/usr/sbin/dnsmasq:dnsmasq-base"
  "dig:bind9-dnsutils"
  "fish:fish"
  # tests/fail2ban.rs: the real fail2ban bans through `sallyport ban`
  "fail2ban-client:fail2ban"
)
missing=()
for pair in "${needs[@]}"; do
  cmd=${pair%%:*} pkg=${pair#*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -e "$cmd" ]; then
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

# cargo-deb 3 for the Debian package (packaging/build-deb, tests/deb.rs): installed here, once
# (a few minutes), rather than inside the test, where it would count against its timeout.
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo deb --version 2>/dev/null | grep -q '^cargo-deb 3\.'; then
  echo "scripts/test.sh: installing cargo-deb 3 (cargo install)" >&2
  cargo install cargo-deb --version '^3' --locked --quiet
fi

cargo fmt --check
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --all-targets --quiet -- -D warnings
fi
# The release build that tests/deb.rs packs and bench/run --smoke measures: made once, before
# the tests run in parallel, so the package test only packs it (when extra arguments select
# tests, tests/deb.rs builds it itself if it runs).
if [ $# -eq 0 ]; then
  cargo build --release --quiet
fi
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test "$@"
fi

# The benchmark's smoke mode: every variant (direct; rathole plain, TLS and Noise; sallyport
# plain, TLS and TLS without reuse) moves bytes through iperf3, wrk and the connection tests
# with no errors, three of them over a 1 ms delay relay, and sallyport TLS takes a sustained
# rate briefly in network namespaces; no timing is judged. About 1.5-2 minutes, plus installing
# iperf3/wrk/libssl-dev and building rathole once on a fresh machine.
# Skipped when extra arguments select particular tests, or with SALLYPORT_SKIP_BENCH=1.
# Then the soak's short form (bench/soak --seconds 60, about 70 s plus installing nginx, sshd and
# python3-matplotlib on a fresh machine): two gateways, two agents, churn and every fault once or
# twice; fails on a corrupted byte, an unexplained client failure, a fault that did not heal or
# a leak. Same skip rules; its figures, logs and plot land in target/soak/.
if [ $# -eq 0 ] && [ -z "${SALLYPORT_SKIP_BENCH:-}" ]; then
  bench/run --smoke
  bench/soak --seconds 60
fi
