"""Image decoding and URL rules, unit level."""

import asyncio
import ipaddress

import httpx
import pytest
from PIL import Image

from fluxserve.errors import InvalidInput
from fluxserve.images import compose_references, decode_image, fetch_image_bytes, mask_from_alpha
from fluxserve.netguard import is_public
from fluxserve.spec import fit_megapixel
from tests.support.images_util import bomb_png, encoded, png_bytes


def test_bomb_rejected_before_pixels() -> None:
    with pytest.raises(InvalidInput) as err:
        decode_image(bomb_png(), param="image")
    assert err.value.code == "image_too_large"
    with pytest.raises(InvalidInput, match="9000x9000") as err:
        decode_image(bomb_png(9000, 9000), param="image")  # under Pillow's own limit, over ours
    assert err.value.code == "image_too_large"


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, I am text", png_bytes()[:60], b"GIF89a" + b"\x00" * 20, encoded(Image.new("RGB", (8, 8)), "BMP")],
)
def test_invalid_files(data: bytes) -> None:
    with pytest.raises(InvalidInput) as err:
        decode_image(data, param="image")
    assert err.value.code == "invalid_image_file"


def test_exif_orientation_and_modes() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    upright = decode_image(encoded(img, "JPEG", exif=exif), param="image")
    assert upright.size == (20, 40)
    rgba = decode_image(png_bytes(mode="RGBA", color=(0, 0, 0, 0)), param="image")
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)
    pal = decode_image(encoded(Image.new("P", (10, 10), 3)), param="image")
    assert pal.mode == "RGB"


def test_mask_semantics_and_size() -> None:
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 16, 32))
    mask = mask_from_alpha(rgba, (32, 32))
    assert mask.getpixel((1, 1)) == 255 and mask.getpixel((30, 1)) == 0
    with pytest.raises(InvalidInput, match="must match"):
        mask_from_alpha(rgba, (64, 64))
    with pytest.raises(InvalidInput, match="no transparent"):
        mask_from_alpha(Image.new("RGBA", (32, 32), (0, 0, 0, 255)), (32, 32))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/",
        "http://[::1]/",
        "file:///etc/passwd",
        "ftp://example.com/a.png",
        "http://localhost:1/a.png",
        "http://0.0.0.0/",
        # IPv6 forms that carry a private IPv4 address: NAT64, 6to4, IPv4-compatible, IPv4-mapped.
        "http://[64:ff9b::7f00:1]/",
        "http://[64:ff9b:1::a00:1]/",
        "http://[2002:a9fe:a9fe::]/",
        "http://[::127.0.0.1]/",
        "http://[::ffff:10.0.0.1]/",
        "http://[::1/",
        "http://example.com:99999/",
    ],
)
def test_private_and_non_http_urls_refused(url: str) -> None:
    with pytest.raises(InvalidInput) as err:
        asyncio.run(fetch_image_bytes(url, param="input_image", allow_private=False))
    assert err.value.code == "invalid_image_url"


def test_ipv6_forms_embedding_public_ipv4_stay_public() -> None:
    assert is_public(ipaddress.ip_address("64:ff9b::808:808")) and is_public(ipaddress.ip_address("2002:808:808::1"))
    assert is_public(ipaddress.ip_address("2001:4860:4860::8888"))
    assert not is_public(ipaddress.ip_address("2002:7f00:1::")) and not is_public(ipaddress.ip_address("::"))


def test_data_urls() -> None:
    import base64

    ok = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    assert asyncio.run(fetch_image_bytes(ok, param="x", allow_private=False)) == png_bytes()
    for bad in ["data:text/plain,hello", "data:image/png;base64,@@@@"]:
        with pytest.raises(InvalidInput):
            asyncio.run(fetch_image_bytes(bad, param="x", allow_private=False))


def test_fit_megapixel_and_canvas() -> None:
    assert fit_megapixel(1024, 1024) == (1024, 1024)
    w, h = fit_megapixel(4000, 3000)
    assert w % 16 == 0 and h % 16 == 0 and abs(w / h - 4 / 3) < 0.05
    canvas = compose_references([Image.new("RGB", (100, 50)), Image.new("RGB", (50, 100))])
    assert canvas.size == (100 * 100 // 50 + 50, 100)


def _resolve_as_public(monkeypatch: pytest.MonkeyPatch, host: str, port: int) -> None:
    """Make the URL checks' DNS answer a public address for ``host`` (other names resolve as usual)."""
    import socket

    real = socket.getaddrinfo

    def fake_dns(name: str, *args: object, **kw: object):  # type: ignore[no-untyped-def]
        if name == host:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]
        return real(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("fluxserve.netguard.socket.getaddrinfo", fake_dns)


def test_redirect_from_public_to_private_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _resolve_as_public(monkeypatch, "images.example", 443)
    hops: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        # Sent to the address that was checked, under the name it was asked for.
        assert request.url.host == "93.184.216.34" and request.extensions["sni_hostname"] == "images.example"
        hops.append(f"{request.url.scheme}://{request.headers['host']}{request.url.path}")
        if request.url.path == "/ok.png":
            return httpx.Response(200, content=png_bytes())
        return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/meta-data"})

    transport = httpx.MockTransport(handler)
    fetched = asyncio.run(
        fetch_image_bytes("https://images.example/ok.png", param="x", allow_private=False, transport=transport)
    )
    assert fetched == png_bytes()
    with pytest.raises(InvalidInput, match="only connects to public"):
        asyncio.run(fetch_image_bytes("https://images.example/r", param="x", allow_private=False, transport=transport))
    assert hops[-1] == "https://images.example/r"  # the private hop was never requested


def test_the_request_goes_to_the_address_that_was_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that answers public, then loopback (DNS rebinding): resolved once, sent to the public one."""
    import socket

    answers = iter(["93.184.216.34", "127.0.0.1", "127.0.0.1"])
    calls: list[str] = []

    def rebinding_dns(name: str, *args: object, **kw: object):  # type: ignore[no-untyped-def]
        calls.append(name)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), 443))]

    monkeypatch.setattr("fluxserve.netguard.socket.getaddrinfo", rebinding_dns)
    seen: list[tuple[str, str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers["host"], request.extensions["sni_hostname"]))
        return httpx.Response(200, content=png_bytes())

    got = asyncio.run(
        fetch_image_bytes(
            "https://rebind.example:8443/a.png", param="x", allow_private=False, transport=httpx.MockTransport(handler)
        )
    )
    assert got == png_bytes() and calls == ["rebind.example"]
    assert seen == [("93.184.216.34", "rebind.example:8443", "rebind.example")]


def test_every_refusal_reads_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    messages = set()
    for url in ("http://127.0.0.1:22/", "http://10.0.0.1:6379/", "http://no-such-host.invalid/", "http://[::1]:80/"):
        with pytest.raises(InvalidInput) as err:
            asyncio.run(fetch_image_bytes(url, param="x", allow_private=False))
        messages.add(err.value.message)
    assert messages == {"x: this server only connects to public http(s) addresses; the URL was refused."}


def test_dns_rebinding_is_caught_at_connect_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name checks out as public, but the socket lands on loopback: refused before the body is read."""
    _resolve_as_public(monkeypatch, "rebind.example", 80)
    from tests.support.image_server import image_server

    with image_server() as base:
        port = base.rsplit(":", 1)[1]

        class Loopback(httpx.AsyncHTTPTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                # What a rebinding DNS answer does: the socket connects somewhere the check never saw.
                request.url = request.url.copy_with(host="127.0.0.1", port=int(port))
                return await super().handle_async_request(request)

        with pytest.raises(InvalidInput, match="only connects to public http"):
            asyncio.run(
                fetch_image_bytes("http://rebind.example/cat.png", param="x", allow_private=False, transport=Loopback())
            )


def test_a_trickling_url_is_cut_at_the_total_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each byte arrives before any read timeout, but the whole fetch has one deadline."""
    import time
    from http.server import BaseHTTPRequestHandler

    from tests.support.image_server import serve_loopback

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

        def log_message(self, *args: object) -> None:
            pass

    monkeypatch.setattr("fluxserve.images.FETCH_TIMEOUT_S", 1.0)
    with serve_loopback(Trickle) as base:
        start = time.monotonic()
        with pytest.raises(InvalidInput, match="took longer than 1 s"):
            asyncio.run(fetch_image_bytes(f"{base}/slow.png", param="x", allow_private=True))
        assert time.monotonic() - start < 3


def test_a_longest_prompt_in_a_three_byte_script_still_encodes_as_jpeg_and_webp() -> None:
    # 32,000 characters of 3 bytes each overflowed the 64 KiB EXIF segment: the job failed after generating.
    from PIL import Image

    from fluxserve.outputs import encode_image, read_metadata

    prompt = "画" * 32000
    for fmt in ("jpeg", "webp"):
        data = encode_image(Image.new("RGB", (64, 64)), fmt, 90, {"prompt": prompt, "seed": 7})
        meta = read_metadata(data)
        assert meta["seed"] == 7 and meta["prompt_truncated"] is True
        assert str(meta["prompt"]) == prompt[: len(str(meta["prompt"]))] and len(str(meta["prompt"])) > 9000
    short = read_metadata(encode_image(Image.new("RGB", (64, 64)), "jpeg", 90, {"prompt": "un café", "seed": 1}))
    assert short == {"prompt": "un café", "seed": 1}  # non-ASCII text survives (it came back as "?")
