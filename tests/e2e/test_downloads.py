"""Weights from the hub when a name first needs them (issue 34): a fake hub on loopback serves a demo folder as
``acme/tiny-flux``; the first job downloads it with progress in its log and in /health, each file once; a
kill -9 halfway resumes where it stopped."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from fluxserve.engine.inventory import inventory
from fluxserve.models.demo import demo_weights
from tests.support.fake_hub import COMMIT, Repo, fake_hub
from tests.support.polling import wait_for
from tests.support.server import RemoteServer

KEY = "fs-download-test-key"


def _server(tmp_path: Path, hub: str, cache: Path, data: Path, *more: str) -> RemoteServer:
    cfg = tmp_path / "models.toml"
    cfg.write_text('[models.flux-schnell]\nweights = "acme/tiny-flux"\n')
    env = {"HF_ENDPOINT": hub, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0", "FLUXSERVE_LEASE_S": "2"}
    args = ("--model-config", str(cfg), "--models", "flux-schnell", "--device", "cpu", *more)
    return RemoteServer(data, api_key=KEY, extra_args=args, env=env, demo=False)


def _create(server: RemoteServer) -> str:
    body = {"input": {"prompt": "a cat", "megapixels": "0.25", "num_inference_steps": 2}}
    made = httpx.post(
        f"{server.url}/v1/models/black-forest-labs/flux-schnell/predictions", json=body, headers=server.headers
    )
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def _get(server: RemoteServer, pid: str) -> dict[str, object]:
    return httpx.get(f"{server.url}/v1/predictions/{pid}", headers=server.headers).json()  # type: ignore[no-any-return]


def _part_sizes(cache: Path) -> list[int]:
    """Sizes of the partial downloads now; a small file's ``.part`` may be renamed between listing and stat."""
    sizes = []
    for part in cache.rglob("*.part"):
        try:
            sizes.append(part.stat().st_size)
        except FileNotFoundError:
            continue  # finished and renamed in between: not partial any more
    return sizes


def test_a_first_job_downloads_its_weights_once_with_progress(tmp_path: Path, demo_model_dir: Path) -> None:
    folder = demo_weights(demo_model_dir, "text2img")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    repo = Repo(folder, bytes_per_s=size / 4)  # about four seconds
    with fake_hub({"acme/tiny-flux": repo}) as hub:
        server = _server(tmp_path, hub, tmp_path / "hub-cache", tmp_path / "data").start()
        try:
            models = httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"]
            schnell = next(m for m in models if m["id"] == "flux-schnell")
            # Sized from the hub's listing and headers before anything is downloaded.
            assert schnell["state"] == "unloaded" and schnell["memory_bytes"] > 0, schnell
            listed = schnell["memory_bytes"]
            assert not [n for n, _ in repo.downloads() if n.endswith(".safetensors")], repo.served
            pid = _create(server)
            seen = wait_for(
                lambda: httpx.get(f"{server.url}/health").json()["engine"].get("downloads", {}),
                lambda d: "acme/tiny-flux" in d and d["acme/tiny-flux"]["done_bytes"] > 0,
                timeout=60,
                interval=0.1,
            )
            assert seen["acme/tiny-flux"]["total_bytes"] > seen["acme/tiny-flux"]["done_bytes"]
            done = wait_for(lambda: _get(server, pid), lambda p: p["status"] in ("succeeded", "failed"), timeout=120)
            assert done["status"] == "succeeded", done
            logs = str(done["logs"]).splitlines()
            assert any(line.startswith("downloading acme/tiny-flux for flux-schnell: ") for line in logs), logs
            weights = [name for name, _ in repo.downloads() if name.endswith(".safetensors")]
            assert sorted(weights) == sorted(set(weights)) and len(weights) == 4  # each file once
            # Sized now that the files are here; a second job downloads nothing.
            models = httpx.get(f"{server.url}/v1/models", headers=server.headers).json()["data"]
            schnell = next(m for m in models if m["id"] == "flux-schnell")
            # The listing's figure is the downloaded files' own (float32 on this CPU); the loaded pipeline's
            # measured size adds a few buffers the files do not hold.
            snapshot = tmp_path / "hub-cache" / "models--acme--tiny-flux" / "snapshots" / COMMIT
            assert listed == sum(p.nbytes for p in inventory(str(snapshot), 4) or [])
            assert abs(schnell["memory_bytes"] - listed) < 0.01 * listed
            before = len(repo.downloads())
            again = _create(server)
            wait_for(lambda: _get(server, again), lambda p: p["status"] == "succeeded", timeout=60)
            assert len(repo.downloads()) == before
        finally:
            server.stop()


def test_a_download_killed_halfway_resumes_after_a_restart(tmp_path: Path, demo_model_dir: Path) -> None:
    big = tmp_path / "repo"
    shutil.copytree(demo_weights(demo_model_dir, "text2img"), big)
    # A weights file the pipeline needs, large enough to be cut off halfway at the hub's pace: the T5 encoder's
    # tensors plus one it does not use (loading ignores it).
    import torch
    from safetensors.torch import load_file, save_file

    encoder = big / "text_encoder_2" / "model.safetensors"
    tensors = load_file(encoder)
    save_file({**tensors, "unused_padding": torch.ones(6 * 1024 * 1024)}, encoder, metadata={"format": "pt"})  # 24 MiB
    repo = Repo(big, bytes_per_s=6 * 1024 * 1024)
    cache, data = tmp_path / "hub-cache", tmp_path / "data"
    with fake_hub({"acme/tiny-flux": repo}) as hub:
        server = _server(tmp_path, hub, cache, data).start()
        try:
            pid = _create(server)
            wait_for(lambda: _part_sizes(cache), lambda sizes: max(sizes, default=0) >= 10 * 1024 * 1024, timeout=60)
            server.kill9()
            partial = {p.name: p.stat().st_size for p in cache.rglob("*.part")}
            assert partial
            served_before = len(repo.downloads())
            repo.bytes_per_s = 0
            server = _server(tmp_path, hub, cache, data).start()
            done = wait_for(lambda: _get(server, pid), lambda p: p["status"] in ("succeeded", "failed"), timeout=120)
            assert done["status"] == "succeeded", done
            resumed = [r for _, r in repo.downloads()[served_before:] if r.startswith("bytes=") and r != "bytes=0-"]
            assert resumed, repo.served  # asked for the rest, not the whole file again
            assert not list(cache.rglob("*.part"))
        finally:
            server.stop()


def test_a_hub_name_too_big_for_the_budget_is_refused_at_start_before_any_download(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    repo = Repo(demo_weights(demo_model_dir, "text2img"))
    with fake_hub({"acme/tiny-flux": repo}) as hub:
        server = _server(tmp_path, hub, tmp_path / "hub-cache", tmp_path / "data", "--memory-budget", "64KiB")
        server.start(until="error")
        try:
            health = httpx.get(f"{server.url}/health")
        finally:
            server.stop()
    assert health.status_code == 503, health.text
    error = health.json()["error"]
    assert "model 'flux-schnell' (acme/tiny-flux) needs" in error and "the memory budget is 64 KiB" in error, error
    assert not [n for n, _ in repo.downloads() if n.endswith(".safetensors")]  # sized from headers alone
