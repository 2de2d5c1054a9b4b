#!/usr/bin/env bash
# Make sure the renderers the browser tests use are installed: Debian's chromium and its chromedriver (the portal),
# and librsvg's rsvg-convert (the seal's QR code is decoded from its PNGs). Idempotent: does nothing when all are there. Installs them with apt-get when run as root; otherwise
# stops with a message saying how to get them (the browser tests fail rather than skip without them).
set -euo pipefail

CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver
RSVG=/usr/bin/rsvg-convert

if [[ -x "$CHROMIUM" && -x "$CHROMEDRIVER" && -x "$RSVG" ]]; then
  exit 0
fi

how_to="install Debian's packages as root: apt-get update && apt-get install -y chromium chromium-driver librsvg2-bin"

if [[ "$(id -u)" -ne 0 ]]; then
  echo "ensure-browser: $CHROMIUM, $CHROMEDRIVER or $RSVG is missing and this is not root; $how_to" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-browser: $CHROMIUM, $CHROMEDRIVER or $RSVG is missing and apt-get is not available; install Chromium and a matching chromedriver at those paths" >&2
  exit 1
fi

echo "ensure-browser: installing chromium, chromium-driver and librsvg2-bin (for the browser and QR code tests)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver librsvg2-bin; } >&2; then
  echo "ensure-browser: apt-get could not install chromium, chromium-driver and librsvg2-bin; $how_to" >&2
  exit 1
fi
if [[ ! -x "$CHROMIUM" || ! -x "$CHROMEDRIVER" || ! -x "$RSVG" ]]; then
  echo "ensure-browser: apt-get finished but $CHROMIUM, $CHROMEDRIVER or $RSVG is still missing; $how_to" >&2
  exit 1
fi
