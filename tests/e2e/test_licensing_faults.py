"""BFL licence usage across kill -9 (issue 37), against the real server process and a stand-in for BFL's
endpoint on loopback: counts committed but not yet sent when the server dies are sent by the next start; a
report in flight when it dies is sent again under the same Idempotency-Key; each generation is counted once."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support.licence_server import licence_server
from tests.support.polling import wait_for
from tests.support.server import RemoteServer

KEY = "e2e-licence-key-0123456789"


def _config(path: Path, base: str, interval_s: float, lease_s: float = 60) -> None:
    path.write_text(
        f'[licensing.bfl]\nbase_url = "{base}"\nkey_env = "TEST_BFL_LICENSE"\ninterval_s = {interval_s}\n'
        f'lease_s = {lease_s}\n[licensing.bfl.models]\nflux-dev = "flux-1-dev"\n'
    )


def test_kill9_before_and_during_a_report_counts_each_generation_once(tmp_path: Path, demo_model_dir: Path) -> None:
    config = tmp_path / "models.toml"
    with licence_server() as (base, state):
        _config(config, base, interval_s=600)  # the first start sends only at start: the counts stay unsent
        srv = RemoteServer(
            tmp_path / "srv",
            api_key=KEY,
            demo_model=demo_model_dir,
            extra_args=("--model-config", str(config)),
            env={"TEST_BFL_LICENSE": "licence-key"},
        )
        with srv:
            body = {"model": "flux-dev", "prompt": "p", "n": 2, "size": "256x256", "steps": 2}
            made = httpx.post(f"{srv.url}/v1/images/generations", json=body, headers=srv.headers, timeout=120)
            assert made.status_code == 200, made.text
            srv.kill9()  # committed with the success, not yet sent
        assert state.received == []

        state.answer_after_s = 30  # BFL counts it, but the answer never reaches the server: killed meanwhile
        _config(config, base, interval_s=0.3, lease_s=1)
        srv.start()
        wait_for(lambda: len(state.received), lambda n: n >= 1, timeout=30)
        srv.kill9()
        assert state.total("flux-1-dev") == 2

        state.answer_after_s = 0
        with srv:  # (entering starts it)
            wait_for(lambda: len(state.received), lambda n: n >= 2, timeout=30)
            wait_for(lambda: "reported 2 generations" in srv.log(), lambda ok: ok, timeout=10)
        assert state.total("flux-1-dev") == 2  # sent twice, under one Idempotency-Key: counted once
        assert len({r["idempotency"] for r in state.received}) == 1
        assert {r["n"] for r in state.received} == {2} and {r["key"] for r in state.received} == {"licence-key"}
