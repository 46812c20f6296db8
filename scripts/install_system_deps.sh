#!/usr/bin/env bash
# Debian packages the tests need: Fashion-MNIST's idx files, Prometheus + promtool, and Chromium
# (with a font) for the web page's browser tests (tests/page; Playwright drives this Chromium,
# it never downloads a browser of its own).
set -euo pipefail
pkgs=(dataset-fashion-mnist prometheus chromium fonts-dejavu-core)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "== installing Debian packages for the tests: ${missing[*]} (apt-get; about 1-2 minutes)"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
