#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need,
# then formatting, lints, unit, property, integration and interop tests.
# .ci/run calls this; CI runs it as root on a clean checkout.
#
#   bash tests/run.sh           everything (what CI runs)
#   bash tests/run.sh --quick   for development: the same without the
#                               Python package stage (no torch download,
#                               no wheel build, no pytest)
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    *) echo "usage: bash tests/run.sh [--quick]" >&2; exit 2 ;;
  esac
done

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
cargo --version
cargo fmt --version >/dev/null || { echo "rustfmt is missing: rustup component add rustfmt" >&2; exit 1; }
cargo clippy --version >/dev/null || { echo "clippy is missing: rustup component add clippy" >&2; exit 1; }

step "Debian packages: fio and nginx (the benchmark harness smoke test runs them)"
if ! command -v fio >/dev/null || ! command -v nginx >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq fio nginx >/dev/null
fi
fio --version
nginx -v

step "prometheus and promtool: the metrics test scrapes storaged with a real Prometheus"
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq prometheus >/dev/null
fi
promtool --version | head -1

step "systemd-analyze: the operator test verifies the example systemd unit"
if ! command -v systemd-analyze >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq systemd >/dev/null
fi

step "script(1) and runuser(1): terminal and other-user checks of storagectl"
if ! command -v script >/dev/null || ! command -v runuser >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq bsdutils util-linux >/dev/null
fi

step "openssl(1): the JWT test makes an RS256 key with it"
if ! command -v openssl >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq openssl >/dev/null
fi

step "fuse3: the mount test mounts through /dev/fuse (fusermount3 for non-root use)"
if ! command -v fusermount3 >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq fuse3 >/dev/null
fi
if [ ! -c /dev/fuse ]; then
  echo "/dev/fuse is missing: the mount test needs FUSE (modprobe fuse, or run the container with --device /dev/fuse)" >&2
  exit 1
fi

step "etcd-server: the cluster tests run a real etcd on loopback as the control plane"
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq etcd-server etcd-client >/dev/null
fi
etcd --version | head -1

step "python virtualenv for the interop test (grpcio, health, reflection)"
PY=${PYTHON:-python3}
if ! "$PY" -m venv --help >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq python3-venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements.txt

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo deny: licenses, banned and duplicate crates, sources (deny.toml)"
# Advisories need the RustSec database from GitHub, which this machine
# cannot reach; licenses, bans and sources are checked offline.
if ! cargo deny --version 2>/dev/null | grep -q '^cargo-deny 0\.20\.'; then
  cargo install cargo-deny --locked --version '^0.20'
fi
# Every platform's crates (deny reads the whole graph; a Linux build
# downloads only Linux's).
cargo fetch --locked
cargo deny --offline check licenses bans sources

step "build the binaries the integration tests run"
cargo build --workspace --bins --locked

step "cargo test (unit, proptest, integration on loopback, interop)"
STORAGED_TEST_PYTHON="$PWD/.venv/bin/python" cargo test --workspace --locked --no-fail-fast

if [ "$QUICK" = 1 ]; then
  step "--quick: skipped the Python package stage (wheel, torch, pytest); run without --quick for all of it"
  exit 0
fi

step "python package: the storaged wheel (maturin) in the virtualenv, with torch; pytest"
.venv/bin/python -m pip install -q -r client/python/requirements-test.txt
rm -rf target/wheels
(cd client/python && VIRTUAL_ENV="$PWD/../../.venv" ../../.venv/bin/maturin build -q -o ../../target/wheels)
.venv/bin/python -m pip install -q --force-reinstall --no-deps target/wheels/storaged-*.whl
STORAGED_BIN_DIR="$PWD/target/debug" .venv/bin/python -m pytest -q -p no:cacheprovider client/python/tests
