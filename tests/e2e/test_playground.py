"""The playground in a real browser (Debian's Chromium driven by Playwright) against the real server."""

import io
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.support.images_util import png_bytes
from tests.support.server import RemoteServer

CHROMIUM = os.environ.get("FLUXSERVE_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
# The docs' pictures of the playground are these screenshots: FLUXSERVE_DOCS_SCREENSHOTS=1 writes them there too.
DOCS_ASSETS = Path(__file__).resolve().parents[2] / "docs" / "assets"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, server: RemoteServer) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    p = context.new_page()
    errors: list[str] = []
    p.on("console", lambda m: errors.append(m.text) if _is_error(m) else None)
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p
    context.close()
    assert errors == [], errors


def _is_error(message: ConsoleMessage) -> bool:
    # A rejected key or a dead endpoint is shown to the user; the browser also logs the failed request itself.
    expected = ("401", "ERR_CONNECTION_REFUSED")
    return message.type == "error" and not any(e in message.text for e in expected)


def _shot(page: Page, name: str, *, docs_name: str | None = None) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if docs_name and os.environ.get("FLUXSERVE_DOCS_SCREENSHOTS") == "1":
        page.screenshot(path=str(DOCS_ASSETS / f"{docs_name}.png"))


def _connect(page: Page, server: RemoteServer, key: str | None = None) -> None:
    page.goto(server.url)
    page.fill("#endpoint", server.url)
    page.fill("#api-key", key or server.api_key or "")
    page.click("#settings-form button[type=submit]")


def test_generate_and_see_the_image(page: Page, server: RemoteServer) -> None:
    _connect(page, server)
    expect(page.locator("#conn-status")).to_contain_text("Connected")
    expect(page.locator("#model option[value=flux-schnell]")).to_have_text("flux-schnell (demo)")
    page.select_option("#megapixels", "0.25")
    page.fill("#seed", "1234")
    page.fill("#prompt", "a white siamese cat")
    page.keyboard.press("Enter")
    figure = page.locator(".turn figure").first
    expect(figure).to_be_visible(timeout=60_000)
    expect(figure.locator(".seed")).to_have_text("seed 1234")
    expect(figure.locator(".size")).to_have_text("512\u00d7512")
    expect(page.locator(".turn .meta").last).to_contain_text("Done in")
    _shot(page, "playground-generated", docs_name="playground")
    # Full view, keyboard included.
    figure.locator("img").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#viewer")).to_be_visible()
    page.click("#viewer button")
    figure.locator("button", has_text="Copy curl").click()
    expect(figure.locator("button", has_text="Copied")).to_be_visible()
    # Requests queue back to back.
    for prompt in ("first of two", "second of two"):
        page.fill("#prompt", prompt)
        page.keyboard.press("Enter")
    expect(page.locator(".turn figure")).to_have_count(3, timeout=60_000)
    # Shift+Enter is a new line, not a send.
    page.fill("#prompt", "line one")
    page.locator("#prompt").press("Shift+Enter")
    assert page.locator(".turn").count() == 3
    assert page.input_value("#prompt") == "line one\n"


def test_wrong_key_is_shown(page: Page, server: RemoteServer) -> None:
    _connect(page, server, key="fs-wrong-key")
    expect(page.locator("#banner")).to_be_visible()
    expect(page.locator("#banner")).to_contain_text("401")
    _shot(page, "playground-wrong-key")


def test_unreachable_endpoint_is_shown(page: Page, server: RemoteServer) -> None:
    # A port held bound but never listening: refused, and no server another test starts meanwhile can take it
    # (a port merely found free was once taken by one, which answered 401).
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{holder.getsockname()[1]}"
        page.goto(server.url)
        page.fill("#endpoint", dead)
        page.fill("#api-key", "anything")
        page.click("#settings-form button[type=submit]")
        expect(page.locator("#banner")).to_contain_text(f"Cannot reach {dead}")


def test_edit_with_an_attached_image_then_history_survives_reload(
    page: Page, server: RemoteServer, tmp_path: Path
) -> None:
    _connect(page, server)
    expect(page.locator("#conn-status")).to_contain_text("Connected")
    page.evaluate("indexedDB.deleteDatabase('fluxserve-playground')")
    page.reload()
    picture = tmp_path / "lotion.png"
    picture.write_bytes(png_bytes((320, 320), (40, 160, 220)))
    page.set_input_files("#file", str(picture))
    expect(page.locator("#attachments img")).to_have_count(1)
    page.fill("#prompt", "a gift basket with the items from the picture")
    page.click("#send")
    figure = page.locator(".turn figure").first
    expect(figure).to_be_visible(timeout=120_000)
    expect(page.locator(".turn .refs img")).to_have_count(1)
    expect(page.locator(".turn .meta").first).to_contain_text("flux-kontext-pro")
    _shot(page, "playground-edit")
    download = page.locator(".turn figure a").first
    assert download.get_attribute("download", timeout=5000).startswith("fluxserve-a-gift-basket")  # type: ignore[union-attr]
    page.reload()
    expect(page.locator(".turn figure img")).to_have_count(1, timeout=10_000)
    expect(page.locator(".turn .prompt")).to_have_text("a gift basket with the items from the picture")
    page.click("#clear-history")
    expect(page.locator(".turn")).to_have_count(0)


def test_phone_width_layout(browser: Browser, server: RemoteServer) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = context.new_page()
    _connect(page, server)
    expect(page.locator("#conn-status")).to_contain_text("Connected")
    page.fill("#prompt", "phone")
    page.click("#send")
    expect(page.locator(".turn figure img")).to_be_visible(timeout=60_000)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"horizontal scroll at phone width: {width}px"
    shot = page.screenshot(path=str(ARTIFACTS / "playground-phone.png"), full_page=True)
    assert Image.open(io.BytesIO(shot)).size[0] == 390
    context.close()


def test_served_offline(server: RemoteServer) -> None:
    import httpx

    html = httpx.get(server.url + "/").text
    assert '<script type="module" src="/web/app.js">' in html
    for asset in ("app.js", "history.js", "style.css"):
        body = httpx.get(f"{server.url}/web/{asset}").text
        assert "https://" not in body and "http://" not in body.replace("http://127.0.0.1:8000", "")


def test_controls_follow_the_model_registry_and_flux2_edits_natively(
    page: Page, server: RemoteServer, tmp_path: Path
) -> None:
    _connect(page, server)
    expect(page.locator("#conn-status")).to_contain_text("Connected")
    page.select_option("#model", "flux-dev")
    expect(page.locator(".guidance")).to_be_visible()
    expect(page.locator("#guidance")).to_have_attribute("placeholder", "default 3.5")
    expect(page.locator("#steps")).to_have_attribute("max", "50")
    page.select_option("#model", "flux-2-klein-4b")
    expect(page.locator(".guidance")).to_be_hidden()  # distilled klein takes no guidance
    expect(page.locator("#steps")).to_have_attribute("max", "8")
    expect(page.locator("#steps")).to_have_attribute("placeholder", "default 4")
    pictures = []
    for i, color in enumerate([(220, 180, 40), (40, 160, 220)]):
        pictures.append(tmp_path / f"ref-{i}.png")
        pictures[-1].write_bytes(png_bytes((384, 256), color))
    page.set_input_files("#file", [str(p) for p in pictures])
    expect(page.locator("#attach-note")).to_have_text("Edit with flux-2-klein-4b (up to 4 images)")
    page.fill("#prompt", "both objects on one table")
    page.click("#send")
    expect(page.locator(".turn figure").first).to_be_visible(timeout=120_000)
    expect(page.locator(".turn .refs img")).to_have_count(2)
    expect(page.locator(".turn .meta").first).to_contain_text("flux-2-klein-4b")
    _shot(page, "playground-flux2-edit")
