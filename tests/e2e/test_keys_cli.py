"""The key CLI contract scripts rely on, against the real server."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fluxserve.migrations import LATEST
from tests.support.server import FLUXSERVE, RemoteServer


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXSERVE_")}
    return subprocess.run([FLUXSERVE, *args], capture_output=True, text=True, timeout=60, env=env, check=False)


def _status(srv: RemoteServer, key: str) -> int:
    return httpx.get(f"{srv.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def test_first_start_prints_a_working_key_once(tmp_path: Path, demo_model_dir: Path) -> None:
    data = tmp_path / "data"
    srv = RemoteServer(data, api_key=None, demo_model=demo_model_dir).start()
    try:
        keys = re.findall(r"fs-[A-Za-z0-9_-]{30,}", srv.log())
        assert len(keys) == 1
        assert _status(srv, keys[0]) == 200
        assert _status(srv, "fs-guess") == 401
    finally:
        srv.stop()
    again = RemoteServer(data, api_key=None).start()
    try:
        assert again.log_path != srv.log_path
        assert re.findall(r"fs-[A-Za-z0-9_-]{30,}", again.log()) == []  # shown once, never again
    finally:
        again.stop()


def test_keys_create_list_revoke(tmp_path: Path, demo_model_dir: Path) -> None:
    data = tmp_path / "data"
    created = _cli("keys", "create", "--name", "ci", "--data-dir", str(data))
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert re.fullmatch(r"fs-[A-Za-z0-9_-]+", key) and created.stdout == key + "\n"
    listed = _cli("keys", "list", "--data-dir", str(data)).stdout
    assert "ci" in listed and "active" in listed and key not in listed
    srv = RemoteServer(data, api_key=None, demo_model=demo_model_dir).start()
    try:
        assert "Created the first API key" not in srv.log()
        assert _status(srv, key) == 200
        assert _cli("keys", "revoke", "ci", "--data-dir", str(data)).returncode == 0
        time.sleep(0.1)
        assert _status(srv, key) == 401
        assert _cli("keys", "revoke", "ci", "--data-dir", str(data)).returncode == 1
    finally:
        srv.stop()


def test_keys_limits_create_update_list(tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path / "data"))
    assert _cli("keys", "create", "--name", "team", "--rpm", "30", *data).returncode == 0
    listed = _cli("keys", "list", *data).stdout
    assert "max_queued=- rpm=30 images_per_day=-" in listed
    assert _cli("keys", "update", "team", "--images-per-day", "500", "--max-queued", "0", *data).returncode == 0
    assert "max_queued=0 rpm=30 images_per_day=500" in _cli("keys", "list", *data).stdout
    nothing = _cli("keys", "update", "team", *data)
    assert nothing.returncode == 2 and "Nothing to change" in nothing.stderr
    assert _cli("keys", "update", "nobody", "--rpm", "1", *data).returncode == 1
    negative = _cli("keys", "update", "team", "--rpm", "-1", *data)
    assert negative.returncode == 2 and "Traceback" not in negative.stderr


def test_usage_command_table_and_json(tmp_path: Path, demo_model_dir: Path) -> None:
    data = tmp_path / "data"
    key = _cli("keys", "create", "--name", "team", "--data-dir", str(data)).stdout.strip()
    srv = RemoteServer(data, api_key=None, demo_model=demo_model_dir).start()
    try:
        body = {"prompt": "u", "size": "256x256", "n": 2, "steps": 1}
        resp = httpx.post(
            f"{srv.url}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )
        assert resp.status_code == 200, resp.text
    finally:
        srv.stop()
    table = _cli("usage", "--data-dir", str(data))
    assert table.returncode == 0 and "team" in table.stdout and "flux" in table.stdout, table.stderr
    lines = _cli("usage", "--key", "team", "--json", "--data-dir", str(data)).stdout.splitlines()
    [row] = [json.loads(line) for line in lines]
    assert row["key"] == "team" and row["jobs"] == 1 and row["images"] == 2 and row["megapixels"] == 0.131
    assert _cli("usage", "--key", "nobody", "--data-dir", str(data)).returncode == 1
    bad = _cli("usage", "--since", "last week", "--data-dir", str(data))
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr


def test_data_dir_from_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXSERVE_")}
    env["FLUXSERVE_DATA_DIR"] = str(tmp_path / "envdata")
    out = subprocess.run(
        [FLUXSERVE, "keys", "create", "--name", "x"], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    assert out.stdout.startswith("fs-")
    assert (tmp_path / "envdata" / "fluxserve.db").is_file()


def test_generate_command_writes_images(tmp_path: Path, demo_model_dir: Path) -> None:
    import shutil

    from PIL import Image

    from fluxserve.outputs import read_metadata

    shutil.copytree(demo_model_dir, tmp_path / "data" / "demo-model")
    out = _cli(
        "generate",
        "a lighthouse",
        "--demo",
        "--model",
        "flux-dev",
        "--size",
        "512x256",
        "-n",
        "2",
        "--seed",
        "7",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "imgs"),
        "--data-dir",
        str(tmp_path / "data"),
    )
    assert out.returncode == 0, out.stderr
    files = [Path(p) for p in out.stdout.split()]
    assert [f.name for f in files] == ["flux-dev-7.png", "flux-dev-8.png"]
    assert Image.open(files[0]).size == (512, 256)
    assert read_metadata(files[0].read_bytes())["seed"] == 7
    bad = _cli("generate", "x", "--demo", "--size", "100x100", "--data-dir", str(tmp_path / "data"))
    assert bad.returncode == 2 and "multiples of 16" in bad.stderr


def test_bad_serve_flags_exit_2_with_one_clear_line(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    for args, expected in [
        (("--attention", "flsh"), "attention: Value error, attention must be one of auto, flash"),
        (("--cache", "teacache"), "cache: Value error, --cache must be 'first-block'"),
        (("--offload", "sometimes"), "offload: Input should be 'none', 'model', 'group' or 'auto'"),
        (("--quantize", "fp8", "--device", "cpu"), "quantize: --quantize fp8 needs a CUDA GPU"),
    ]:
        out = _cli("serve", "--data-dir", data, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert expected in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_serve_without_the_engine_extra_says_what_to_install(tmp_path: Path) -> None:
    # A real serve process on an install where diffusers cannot be found (find_spec is what the check uses).
    hide = (
        "import importlib.util as u, sys; real = u.find_spec; "
        "u.find_spec = lambda n, *a: None if n == 'diffusers' else real(n, *a); "
        f"sys.argv = ['fluxserve', 'serve', '--data-dir', {str(tmp_path / 'data')!r}]; "
        "from fluxserve.cli import main; main()"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXSERVE_")}
    out = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode == 2, out.stderr
    assert "diffusers not installed" in out.stderr and "pip install 'fluxserve[engine]'" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_db_upgrade_applies_missing_steps_once(tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path / "data"))
    first = _cli("db", "upgrade", *data)
    assert first.returncode == 0, first.stderr
    assert "applied 1: jobs and api keys" in first.stdout and "applied 2:" in first.stdout
    assert "applied 3: per-key limits, image counts" in first.stdout
    again = _cli("db", "upgrade", *data)
    assert again.returncode == 0 and "applied" not in again.stdout and f"schema at version {LATEST}" in again.stdout
