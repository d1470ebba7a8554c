#!/usr/bin/env bash
# Install the project with its test extras and run the whole test suite.
# pytest exits 5 when it collects no tests; tests/conftest.py turns that into a failure (exit 1).
set -euo pipefail
cd "$(dirname "$0")/.."
# From the distribution (CI runs as root on a fresh Debian machine): headless Chromium for the web page
# test, tcpdump for the wire-capture test, nftables for the NAT test bed.
command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v tcpdump >/dev/null \
    && command -v nft >/dev/null \
    || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver tcpdump nftables)
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
python3 -m pytest "$@"
