"""A Docker engine for the container tests, on a machine with no registry (../shared/reference/containers-here.md):
Debian's docker.io and docker-compose, a dockerd of our own (own roots and socket), a Debian base made with
debootstrap and `docker import`, and local stand-ins tagged with the public names the shipped Dockerfile and
compose file use (python:3.11-slim, postgres:15), so what users build is what the test builds.

The engine's data root lives in the temp dir and is kept between runs: the base and stand-ins are made once
per machine, and BuildKit's layer cache makes a rebuild of an unchanged image take seconds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STANDINS = ROOT / "tests" / "support" / "containers"
CACHE = Path(tempfile.gettempdir()) / "fluxserve-docker"
DEBIAN_CLI = "/usr/bin/docker"  # Debian's 20.10 client drives dockerd's built-in BuildKit; newer ones want buildx
PACKAGES = ("docker.io", "docker-compose", "debootstrap", "iptables")


def _apt_install() -> None:
    if all(shutil.which(t) for t in ("dockerd", "docker-compose", "debootstrap")) and Path(DEBIAN_CLI).exists():
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    install = [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, capture_output=True).returncode != 0:
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(install, check=True, capture_output=True)


def debian_mirror() -> str:
    """The mirror apt is configured with here (deb822 or one-line sources), never a hard-coded host."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]:
        text = path.read_text() if path.is_file() else ""
        if match := re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+bookworm", text, re.M
        ):
            return match.group(1)
    raise RuntimeError("no Debian mirror found in apt's sources")


class Docker:
    def __init__(self, sock: Path) -> None:
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER_BUILDKIT": "1"}

    def run(self, *args: str, timeout: float = 900, check: bool = True, cwd: Path | None = None) -> str:
        done = subprocess.run(
            [DEBIAN_CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-4000:]}")
        return done.stdout

    def compose(self, project: str, *args: str, files: list[Path], timeout: float = 600, check: bool = True) -> str:
        cmd = ["docker-compose", "-p", project, *[a for f in files for a in ("-f", str(f))], *args]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {done.stdout[-3000:]}{done.stderr[-3000:]}")
        return done.stdout + done.stderr

    def has_image(self, tag: str) -> bool:
        return bool(self.run("images", "-q", tag).strip())

    def build(self, tag: str, context: Path, *args: str, dockerfile: Path | None = None) -> float:
        start = time.monotonic()
        self.run("build", "-q", "-t", tag, *(["-f", str(dockerfile)] if dockerfile else []), *args, str(context))
        return time.monotonic() - start

    def size_mb(self, tag: str) -> float:
        return int(self.run("image", "inspect", "-f", "{{.Size}}", tag).strip()) / 1e6


def _make_base(docker: Docker) -> None:
    """local/debian:bookworm from debootstrap, with this machine's extra CA certificates (an egress proxy)."""
    if docker.has_image("local/debian:bookworm"):
        return
    rootfs = CACHE / "rootfs"
    if not (rootfs / "bin" / "sh").exists():
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()],
            check=True,
            capture_output=True,
            timeout=900,
        )
    (rootfs / "etc/apt/sources.list").write_text(f"deb {debian_mirror()} bookworm main\n")
    (rootfs / "etc/apt/apt.conf.d/docker-no-recommends").write_text(
        'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n'
    )
    cas = rootfs / "usr/local/share/ca-certificates"
    cas.mkdir(parents=True, exist_ok=True)
    for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
        shutil.copy(crt, cas / crt.name)
    with subprocess.Popen(
        [
            "tar",
            "-C",
            str(rootfs),
            "--numeric-owner",
            "--exclude=./proc/*",
            "--exclude=./sys/*",
            "--exclude=./dev/*",
            "--exclude=./var/lib/apt/lists/*",
            "-c",
            ".",
        ],
        stdout=subprocess.PIPE,
    ) as tar:
        subprocess.run(
            [
                DEBIAN_CLI,
                "import",
                "-c",
                "ENV LANG=C.UTF-8",
                "-c",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "-c",
                'CMD ["bash"]',
                "-",
                "local/debian:bookworm",
            ],
            stdin=tar.stdout,
            env=docker.env,
            check=True,
            capture_output=True,
            timeout=600,
        )


def _standins(docker: Docker) -> None:
    for tag, folder in (("python:3.11-slim", "python"), ("postgres:15", "postgres"), ("local/s3:ci", "s3")):
        if not docker.has_image(tag):
            docker.build(tag, STANDINS / folder)


@contextmanager
def docker_engine() -> Iterator[Docker]:
    """A running dockerd with the base and stand-in images in it; stopped (by its pid) after."""
    _apt_install()
    CACHE.mkdir(parents=True, exist_ok=True)
    sock = CACHE / "docker.sock"
    log = open(CACHE / "dockerd.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            "dockerd",
            "--data-root",
            str(CACHE / "data"),
            "--exec-root",
            str(CACHE / "exec"),
            "--pidfile",
            str(CACHE / "dockerd.pid"),
            "-H",
            f"unix://{sock}",
            "--storage-driver",
            "overlay2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    docker = Docker(sock)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([DEBIAN_CLI, "info"], env=docker.env, capture_output=True).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((CACHE / "dockerd.log").read_text()[-3000:])
            time.sleep(0.5)
        _make_base(docker)
        _standins(docker)
        yield docker
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
