"""The Node clients people point at image APIs, pinned in tests/e2e/js (scripts/test.sh installs them):
openai-node 6.49 and replicate-js 1.4, against the real server."""

import json
import shutil
import subprocess
from pathlib import Path

from tests.support.server import RemoteServer

JS = Path(__file__).parent / "js"


def test_openai_node_edit_stream_and_replicate_js_models_stream_cancel(server: RemoteServer) -> None:
    node = shutil.which("node")
    assert node is not None and (JS / "node_modules" / "replicate").is_dir(), "run scripts/test.sh (npm ci)"
    done = subprocess.run(
        [node, str(JS / "clients.mjs"), server.url, server.api_key or ""],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # Edits stream as the OpenAI spec does (before: plain JSON, and the SDK yielded nothing).
    assert out["edit_stream"] == ["image_edit.partial_image", "image_edit.completed"]
    # files.create sends its metadata as a second file part: a 422 "Too many files" before.
    assert out["file"] == ["js upload", 155, True]
    # models.get was a 404; the stream URL needed a token replicate-js does not send.
    assert out["model"] == ["black-forest-labs", "flux-schnell", 64]
    assert out["stream"][-2:] == ["output", "done"] and "logs" in out["stream"]
    assert out["cancel"] == "canceled"  # not "processing" for a second
