#!/usr/bin/env bash
# Make sure the headless browser the portal tests drive is installed: Debian's chromium and its chromedriver.
# Idempotent: does nothing when both are there. Installs them with apt-get when run as root; otherwise
# stops with a message saying how to get them (the browser tests fail rather than skip without them).
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

if [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" ]]; then
  exit 0
fi

how_to="install Debian's packages as root: apt-get update && apt-get install -y chromium chromium-driver"

if [[ "$(id -u)" -ne 0 ]]; then
  echo "ensure-browser: $CHROMIUM or $CHROMEDRIVER is missing and this is not root; $how_to" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-browser: $CHROMIUM or $CHROMEDRIVER is missing and apt-get is not available; install Chromium and a matching chromedriver at those paths" >&2
  exit 1
fi

echo "ensure-browser: installing chromium and chromium-driver (for the portal's browser tests)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >&2; then
  echo "ensure-browser: apt-get could not install chromium and chromium-driver; $how_to" >&2
  exit 1
fi
if [[ ! -x "$CHROMIUM" || ! -x "$CHROMEDRIVER" ]]; then
  echo "ensure-browser: apt-get finished but $CHROMIUM or $CHROMEDRIVER is still missing; $how_to" >&2
  exit 1
fi
