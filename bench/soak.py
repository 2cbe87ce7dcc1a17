"""The chaos soak for longer than CI runs it: tests/e2e/test_soak.py with FLUXSERVE_SOAK_S seconds of faults.

    python bench/soak.py [--seconds 1800]

Prints the soak's report line (accepted, succeeded, creates by status, faults injected, webhooks delivered)
and fails if an invariant broke. Loopback only, bounded; never part of the suite's pass/fail.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1800)
    args = parser.parse_args()
    env = {**os.environ, "FLUXSERVE_SOAK_S": str(args.seconds)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "tests/e2e/test_soak.py"]
    raise SystemExit(subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode)


if __name__ == "__main__":
    main()
