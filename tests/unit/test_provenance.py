"""Provenance marks: the watermark's robustness, the C2PA manifest as the reference reader sees it, the
certificate (self-signed from the secret, or the operator's), and what happens when signing fails."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from fluxserve.outputs import encode_image, read_metadata
from fluxserve.provenance import Ingredient, Provenance, SigningFailed, certs, mark_of, watermark
from fluxserve.provenance.check import check
from tests.support.images_util import encoded
from tests.support.provenance_util import actions, c2pa_report, operator_pair, photo, stripped

MARK = 0xA1B2C3D4E5F6
TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"


@pytest.fixture(scope="module")
def marked() -> Image.Image:
    return watermark.embed(photo(), MARK)


def test_the_watermark_reads_back_after_jpeg_q75_and_a_half_size_copy(marked: Image.Image) -> None:
    assert watermark.read(marked)[0] == MARK
    assert watermark.read(Image.open(io.BytesIO(encoded(marked, "JPEG", quality=75))))[0] == MARK
    half = marked.resize((512, 512), Image.Resampling.LANCZOS)
    assert watermark.read(half)[0] == MARK
    assert watermark.read(Image.open(io.BytesIO(encoded(half, "JPEG", quality=75))))[0] == MARK
    assert watermark.read(Image.open(io.BytesIO(encoded(marked, "WEBP", quality=80))))[0] == MARK


def test_an_unmarked_image_reads_as_none_and_the_mark_is_invisible(marked: Image.Image) -> None:
    import numpy as np

    for seed in range(3):
        assert watermark.read(photo(512, seed=seed))[0] is None
    assert watermark.read(Image.new("RGB", (512, 512), (10, 200, 90)))[0] is None
    error = np.mean((np.asarray(photo(), float) - np.asarray(marked, float)) ** 2)
    assert 10 * np.log10(255**2 / error) > 40  # PSNR in dB


@pytest.mark.parametrize("color", [(200, 0, 0), (255, 255, 255), (0, 0, 0), (128, 128, 128)])
def test_flat_and_saturated_images_carry_the_mark(color: tuple[int, int, int]) -> None:
    assert watermark.read(watermark.embed(Image.new("RGB", (768, 512), color), MARK))[0] == MARK


def test_marks_are_per_job_and_payloads_check_themselves() -> None:
    assert mark_of("a") != mark_of("b") and mark_of("a") == mark_of("a") and mark_of("a") < 2**48
    bits = watermark.payload(MARK)
    assert len(bits) == 64 and watermark._mark_of(bits) == MARK
    bits[3] ^= 1
    assert watermark._mark_of(bits) is None


def test_the_self_signed_certificate_is_the_same_for_the_same_secret() -> None:
    cert, key = certs.self_signed(b"s" * 32)
    assert certs.self_signed(b"s" * 32)[1] == key
    assert certs.self_signed(b"t" * 32)[1] != key
    assert "fluxserve self-signed" in certs.check_pair(cert, key)
    with pytest.raises(ValueError, match="not the key of the certificate"):
        certs.check_pair(cert, certs.self_signed(b"t" * 32)[1])


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_outputs_validate_with_only_the_untrusted_self_signed_finding(fmt: str) -> None:
    prov = Provenance.configure(b"k" * 32)
    data = prov.output(
        photo(512), "job1", fmt=fmt, quality=90, meta={"seed": 7}, png_level=1, model="flux-dev", prompt="a lighthouse"
    )
    state, failures, manifest = c2pa_report(data)
    assert state == "Valid" and failures == ["signingCredential.untrusted"]
    [created] = actions(manifest)
    assert created["action"] == "c2pa.created" and created["digitalSourceType"] == TRAINED
    assert created["parameters"]["model"] == "flux-dev" and created["softwareAgent"]["name"] == "fluxserve"
    assert "a lighthouse" not in str(manifest)  # no prompt unless the operator opts in
    image = Image.open(io.BytesIO(data))
    assert TRAINED.encode() in (image.info.get("xmp") or image.info.get("XML:com.adobe.xmp", "").encode())
    assert read_metadata(data)["seed"] == 7  # our own metadata block survives the signing
    found = check(data)
    assert found.c2pa.state == "valid" and found.mark == mark_of("job1") and found.c2pa.mark == mark_of("job1")


def test_the_prompt_goes_in_only_when_the_operator_opts_in() -> None:
    prov = Provenance.configure(b"k" * 32, prompt=True)
    data = prov.output(photo(256), "j", fmt="png", quality=90, meta={}, png_level=1, model="m", prompt="a lighthouse")
    assert "a lighthouse" in str(c2pa_report(data)[2])


def test_an_edit_lists_its_inputs_as_ingredients_keeping_their_manifests() -> None:
    prov = Provenance.configure(b"k" * 32)
    earlier = prov.output(photo(256), "first", fmt="png", quality=90, meta={}, png_level=1, model="flux-dev")
    plain = encoded(photo(256, seed=1), "JPEG")
    data = prov.output(
        photo(256, seed=2),
        "edit",
        fmt="jpeg",
        quality=90,
        meta={},
        png_level=1,
        model="flux-kontext",
        inputs=(Ingredient(earlier, "png", "input-0.png"), Ingredient(plain, "jpeg", "input-1.jpg")),
    )
    state, failures, manifest = c2pa_report(data)
    assert state == "Valid" and failures == ["signingCredential.untrusted"]
    assert [(i["title"], i["relationship"]) for i in manifest["ingredients"]] == [
        ("input-0.png", "parentOf"),
        ("input-1.jpg", "componentOf"),
    ]
    assert manifest["ingredients"][0].get("active_manifest")  # the parent's own manifest kept
    opened, edited = actions(manifest)
    assert opened["action"] == "c2pa.opened" and edited["digitalSourceType"] == COMPOSITE


def test_an_upstream_answer_keeps_the_providers_manifest_as_its_parent() -> None:
    chain, key = operator_pair("Provider signing")
    provider = Provenance.configure(b"p" * 32, cert=chain, key=key)
    theirs = provider.output(photo(256), "theirs", fmt="png", quality=90, meta={}, png_level=1, model="gpt-image-2")
    ours = Provenance.configure(b"k" * 32)
    data, size = ours.stored(
        theirs, "job9", fmt="webp", quality=90, meta={}, model="gpt-image-2", prompt=None, title="openai-0"
    )
    state, _failures, manifest = c2pa_report(data)
    assert state == "Valid" and size == (256, 256)
    [parent] = manifest["ingredients"]
    assert parent["relationship"] == "parentOf" and parent.get("active_manifest")
    assert check(data).mark == mark_of("job9")


def test_an_operators_certificate_is_the_issuer() -> None:
    chain, key = operator_pair("Acme Images signing")
    prov = Provenance.configure(b"k" * 32, cert=chain, key=key)
    data = prov.output(photo(256), "j", fmt="png", quality=90, meta={}, png_level=1, model="flux-dev")
    assert check(data).c2pa.issuer == "Acme Images signing"
    with pytest.raises(ValueError, match="both"):
        Provenance.configure(b"k" * 32, cert=chain)


def test_a_stripped_copy_is_known_by_its_watermark_and_a_tampered_one_is_invalid() -> None:
    prov = Provenance.configure(b"k" * 32)
    data = prov.output(photo(), "job2", fmt="png", quality=90, meta={}, png_level=1, model="flux-dev")
    copy = check(stripped(data, "JPEG", quality=75))
    assert copy.c2pa.state == "not_present" and copy.mark == mark_of("job2") and copy.marked
    jpeg = bytearray(prov.output(photo(256), "j3", fmt="jpeg", quality=90, meta={}, png_level=1, model="m"))
    at = len(jpeg) - 100  # inside the entropy-coded scan: still decodes, no longer what was signed
    jpeg[at] = 0x11 if jpeg[at] != 0x11 else 0x22
    assert check(bytes(jpeg)).c2pa.state == "invalid"
    foreign = check(encoded(photo(512, seed=5), "PNG"))
    assert foreign.c2pa.state == "not_present" and foreign.mark is None and not foreign.marked


def test_a_signing_failure_fails_loudly_and_is_counted() -> None:
    cert, key = certs.self_signed(b"k" * 32)
    prov = Provenance.configure(b"k" * 32)
    with pytest.raises(SigningFailed, match="signing the C2PA manifest failed"):
        prov.sign(b"not an image", "png", _claim())
    assert prov.counts[("sign", "failed")] == 1
    assert prov.counts[("sign", "ok")] == 0 and cert and key


def test_provenance_off_encodes_as_before() -> None:
    off = Provenance.off()
    image = photo(256)
    data = off.output(image, "j", fmt="png", quality=90, meta={"a": 1}, png_level=1, model="m")
    assert data == encode_image(image, "png", 90, {"a": 1}, png_compress_level=1)
    assert off.mark("j") is None and check(data).c2pa.state == "not_present"


def _claim():  # type: ignore[no-untyped-def]
    from fluxserve.provenance import Claim

    return Claim("m", time.time(), 1)


def test_a_manifest_named_by_url_is_never_fetched() -> None:
    """c2pa-rs fetches a remote manifest by default: a checked image (or an edit's input) could make the
    server send requests where it names. Here nothing is fetched, and such a file reads as not marked."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import c2pa

    from fluxserve.provenance.manifest import Claim, definition

    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cert, key = certs.self_signed(b"r" * 32)
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", cert, key, None))
        with c2pa.Builder(definition(Claim("m", time.time(), 1), "jpeg")) as builder:
            builder.set_no_embed()
            builder.set_remote_url(f"http://127.0.0.1:{server.server_address[1]}/manifest.c2pa")
            out = io.BytesIO()
            builder.sign(signer, "image/jpeg", io.BytesIO(encoded(photo(64), "JPEG")), out)
        remote = out.getvalue()
        assert check(remote).c2pa.state == "not_present"
        prov = Provenance.configure(b"k" * 32)
        edited = prov.output(
            photo(64),
            "e",
            fmt="png",
            quality=90,
            meta={},
            png_level=1,
            model="m",
            inputs=(Ingredient(remote, "jpeg", "input-0.jpg"),),
        )
        assert c2pa_report(edited)[0] == "Valid"
        assert hits == []
    finally:
        server.shutdown()
        server.server_close()
