#!/usr/bin/env bash
# Install the project with its test extras and run the whole test suite.
# pytest exits 5 when it collects no tests; tests/conftest.py turns that into a failure (exit 1).
set -euo pipefail
cd "$(dirname "$0")/.."
# The web page test drives the distribution's headless Chromium, the network test bed (tests/netbed.py) needs
# nftables, and tcpdump helps look at its traffic (CI runs as root on a fresh Debian machine).
command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v nft >/dev/null \
    && command -v tcpdump >/dev/null \
    || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver nftables tcpdump)
python3 -m pip install --quiet --disable-pip-version-check -e ".[test]"
python3 -m pytest "$@"
