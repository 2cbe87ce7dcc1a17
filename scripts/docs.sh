#!/usr/bin/env bash
# Build the documentation site into site/ (strict: a broken link or anchor, or a page missing from the nav,
# fails the build). The references, benchmark plots and llms.txt are generated from the code at build time
# (docs/hooks/generate.py), so the docs tools run in the project's venv: `scripts/test.sh` installs them
# (the `docs` dependency group). `bash scripts/docs.sh serve` previews it on http://127.0.0.1:8001.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/mkdocs ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade 'pip>=25.1'
  .venv/bin/pip install --quiet -e . --group docs
fi
if [ "${1:-}" = "serve" ]; then
  NO_MKDOCS_2_WARNING=1 exec .venv/bin/mkdocs serve --dev-addr 127.0.0.1:8001
fi
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --clean
test -s site/llms.txt && test -s site/reference/cli/index.html && test -s site/openapi.json
echo "docs: site/ built ($(find site -name '*.html' | wc -l) pages)"
