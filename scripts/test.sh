#!/usr/bin/env bash
# Install fluxserve with its test tools into .venv, then lint, type-check, build the docs and run the whole test suite
# (CPU only, no network but the package registries); with arguments, only `pytest ARGS`. Browser tests drive Debian's Chromium, installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y --no-install-recommends chromium curl >/dev/null \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends chromium curl >/dev/null; }
fi

# PostgreSQL for the scale-out tests (tests/support/pg.py starts a throwaway cluster on loopback, removed after).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y --no-install-recommends postgresql >/dev/null \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends postgresql >/dev/null; }
fi

# The container test (tests/deploy/test_container.py): Debian's Docker engine and compose, debootstrap for a base
# image without a registry; systemd-analyze checks the units in deploy/systemd.
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker-compose >/dev/null 2>&1 \
   || ! command -v debootstrap >/dev/null 2>&1 || ! command -v systemd-analyze >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  pkgs="docker.io docker-compose debootstrap iptables systemd"
  # shellcheck disable=SC2086
  $sudo apt-get install -y --no-install-recommends $pkgs >/dev/null \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends $pkgs >/dev/null; }
fi

# The Node clients of the e2e tests (tests/e2e/js, versions pinned in its lockfile).
if ! command -v npm >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get install -y --no-install-recommends nodejs npm >/dev/null \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends nodejs npm >/dev/null; }
fi
npm ci --prefix tests/e2e/js --silent --no-audit --no-fund

python3 -m venv .venv
# pip 25.1 or newer reads the PEP 735 dependency groups (pyproject.toml [dependency-groups]).
.venv/bin/pip install --quiet --upgrade 'pip>=25.1'
.venv/bin/pip install --quiet torch==2.13.0 -e '.[engine]' --group dev
if [ $# -gt 0 ]; then
  .venv/bin/python -m pytest "$@"
  exit
fi
# Style and types first: they answer in seconds, the suite in tens of minutes.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy src
.venv/bin/lint-imports  # the layers contract (pyproject.toml [tool.importlinter])
bash scripts/docs.sh  # the documentation site, strict (a broken link or a page left out of the nav fails it)
# The tests that need torchvision (FLUX 3's and FLUX.2 [dev]'s processors import it; PyPI's torchvision does
# not import beside the CPU torch above) run in a second venv with a pair that does (a CUDA build of torch,
# about 5.5 GB, that runs on the CPU here). It is installed while the suite runs: two minutes of unpacking
# that would otherwise wait for the suite, or the suite for it.
(
  python3 -m venv .venv-tv
  .venv-tv/bin/pip install --quiet --upgrade 'pip>=25.1'
  .venv-tv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 -e '.[engine]' --group test
) > .venv-tv.log 2>&1 &
tv_install=$!
# The whole suite on SQLite, with line coverage of src/ (the floor is the figure when it was set), in two
# processes (pytest-xdist, a file per process at a time: module fixtures stay whole): much of the suite
# waits (held locks, leases running out, kill -9 and restarts), so two processes on two cores finish sooner
# (three were slower: 1033 s against 956 s for the suite, measured back to back).
.venv/bin/python -m pytest -n 2 --dist loadfile -m "not torchvision and not slow" --cov=fluxserve --cov-report= \
  --durations=30
wait "$tv_install" || { cat .venv-tv.log; exit 1; }
# Coverage of both venvs' runs is counted together. The dialects run once more on PostgreSQL + procrastinate
# instead of SQLite beside the torchvision round (mostly waits on the database while torch computes): their log
# is printed after it.
.venv/bin/python -m pytest -n 2 --dist loadfile --on-postgres tests/api/test_api.py tests/api/test_replicate_api.py \
  tests/api/test_bfl_api.py tests/api/test_api_images.py tests/api/test_api_bad_input.py \
  tests/api/test_batching.py tests/api/test_flux2_api.py tests/api/test_relay_surface.py tests/api/test_job_headers.py \
  tests/api/test_provenance_api.py tests/api/test_safety_api.py tests/api/test_licensing.py tests/api/test_lean.py \
  > .pg-round.log 2>&1 &
pg_round=$!
tv_status=0
.venv-tv/bin/python -m pytest -m "torchvision and not slow" --cov=fluxserve --cov-append --cov-report=term \
  --cov-fail-under=85 || tv_status=$?
pg_status=0
wait "$pg_round" || pg_status=$?
echo "--- the dialects on PostgreSQL ---"
cat .pg-round.log
[ "$tv_status" -eq 0 ] && [ "$pg_status" -eq 0 ]
