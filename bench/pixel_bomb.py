"""A pixel bomb against the real server: what it costs in memory and in stalled requests.

    python bench/pixel_bomb.py [--images 16] [--side 4000]

Loopback only, bounded. `fluxserve serve --demo` as a subprocess; one client sends an OpenAI edit
with ``--images`` one-colour PNGs of ``--side``² pixels (a few KB each, hundreds of MB decoded)
while a second thread probes /health every 50 ms. Prints the answer, the server's peak resident
memory (VmHWM) before and after, and the slowest /health during the request. Not part of the tests.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from _common import KEY, free_port, start_server, stop_server


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--side", type=int, default=4000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    buf = io.BytesIO()
    Image.new("L", (args.side, args.side)).save(buf, format="PNG")
    tmp = Path(tempfile.mkdtemp(prefix="fluxserve-bomb-"))
    try:
        port = free_port()
        server = start_server(tmp / "data", port)
        base = f"http://127.0.0.1:{port}"
        before = _peak_rss_mb(server.pid)
        slowest = [0.0]
        done = threading.Event()

        def probe() -> None:
            with httpx.Client(timeout=30) as http:
                while not done.is_set():
                    t = time.perf_counter()
                    http.get(f"{base}/health")
                    slowest[0] = max(slowest[0], time.perf_counter() - t)
                    time.sleep(0.05)

        prober = threading.Thread(target=probe)
        prober.start()
        files = [("image[]", (f"{i}.png", buf.getvalue(), "image/png")) for i in range(args.images)]
        t = time.perf_counter()
        resp = httpx.post(
            f"{base}/v1/images/edits",
            data={"prompt": "bomb"},
            files=files,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=300,
        )
        answered = time.perf_counter() - t
        time.sleep(0.3)
        done.set()
        prober.join()
        after = _peak_rss_mb(server.pid)
        stop_server(server)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "request": f"{args.images} one-colour PNGs of {args.side}x{args.side} ({len(buf.getvalue())} bytes each)",
        "status": resp.status_code,
        "answer": resp.text[:160],
        "answered_s": round(answered, 3),
        "server_peak_rss_mb_before": round(before, 1),
        "server_peak_rss_mb_after": round(after, 1),
        "slowest_health_s": round(slowest[0], 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
