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

# PostgreSQL for the scale-out tests (tests/pg.py starts a throwaway cluster on loopback, removed after).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y --no-install-recommends postgresql >/dev/null \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends postgresql >/dev/null; }
fi

python3 -m venv .venv
.venv/bin/pip install --quiet torch==2.13.0 -e '.[engine,test]'
.venv/bin/python -m pytest "$@"
if [ $# -eq 0 ]; then
  # The dialects once more, on PostgreSQL + procrastinate instead of SQLite.
  .venv/bin/python -m pytest --on-postgres tests/test_api.py tests/test_replicate_api.py tests/test_bfl_api.py \
    tests/test_api_images.py tests/test_api_bad_input.py tests/test_batching.py tests/test_flux2_api.py
fi
