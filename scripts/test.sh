#!/usr/bin/env bash
# Install fluxserve with its test tools into .venv and run the whole test suite (CPU only, no network
# but the package registries). Browser tests drive Debian's Chromium, installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y --no-install-recommends chromium curl >/dev/null \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends chromium curl >/dev/null; }
fi

python3 -m venv .venv
.venv/bin/pip install --quiet torch==2.13.0 -e '.[engine,test]'
.venv/bin/python -m pytest "$@"
