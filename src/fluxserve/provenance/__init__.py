"""Provenance on every output: an invisible watermark (watermark.py), IPTC/XMP DigitalSourceType in the file's
metadata, and a signed C2PA manifest (manifest.py, certs.py), in that order: the watermark goes into the pixels
before encoding, the manifest is signed over the final bytes (a later re-encode would strip it). check.py reads
them back for POST /v1/content_provenance_checks and `fluxserve verify`."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter

from PIL import Image

from ..images import decode_image
from ..outputs import encode_image
from . import certs, watermark
from .check import file_format
from .manifest import COMPOSITE, TRAINED, Claim, Ingredient, Signer

__all__ = [
    "COMPOSITE",
    "SOURCE_MARK",
    "TRAINED",
    "Claim",
    "Ingredient",
    "Provenance",
    "SigningFailed",
    "ingredient",
    "mark_of",
    "source_key",
    "xmp",
]

log = logging.getLogger("fluxserve.provenance")


class SigningFailed(Exception):
    """An output could not be marked: its job fails rather than ship an unmarked image."""


def mark_of(job_id: str) -> int:
    """The 48-bit mark a job's images carry: a hash of its id, so nothing but the job row (its `mark` column)
    links the two, and an image's mark says nothing of the job to whoever reads it."""
    return int.from_bytes(hashlib.sha256(b"fluxserve mark v1 " + job_id.encode()).digest()[:6])


def xmp(source_type: str) -> bytes:
    """An XMP packet with IPTC's DigitalSourceType, for readers that don't speak C2PA."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        f'Iptc4xmpExt:DigitalSourceType="{source_type}"/>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="r"?>'
    ).encode()


class Provenance:
    """How this process marks its outputs: ``signer`` None means provenance is off (nothing is marked)."""

    def __init__(self, signer: Signer | None, *, issuer: str = "", prompt: bool = False) -> None:
        self._signer = signer
        self.issuer = issuer
        self.prompt = prompt  # the prompt goes into the manifest only where the operator opted in
        self.counts: Counter[tuple[str, str]] = Counter()  # (operation, outcome) -> n, for /metrics
        self._lock = threading.Lock()

    @classmethod
    def off(cls) -> Provenance:
        return cls(None)

    @classmethod
    def configure(
        cls, secret: bytes, *, cert: str | None = None, key: str | None = None, prompt: bool = False
    ) -> Provenance:
        """The operator's certificate and key (PEM text or paths), or the self-signed pair made from the server
        secret (a warning: validators will call it untrusted)."""
        if (cert is None) != (key is None):
            raise ValueError("give both FLUXSERVE_C2PA_CERT and FLUXSERVE_C2PA_KEY, or neither")
        if cert is not None and key is not None:
            cert_pem, key_pem = certs.pem(cert, what="c2pa_cert"), certs.pem(key, what="c2pa_key")
        else:
            cert_pem, key_pem = certs.self_signed(secret)
            log.warning(
                "provenance: signing C2PA manifests with a self-signed certificate (validators will report it "
                "as untrusted); set FLUXSERVE_C2PA_CERT and FLUXSERVE_C2PA_KEY to sign with your own"
            )
        issuer = certs.check_pair(cert_pem, key_pem)
        signer = Signer(cert_pem, key_pem, certs.signing_alg(key_pem))
        try:  # once at start: a certificate c2pa refuses (its key usage, say) stops the server, not each job
            signer.sign(encode_image(Image.new("RGB", (16, 16)), "png", 90, {}), "png", Claim("probe", 0.0, 0))
        except Exception as exc:  # c2pa's own errors: say which, in one sentence
            raise ValueError(f"C2PA signing with this certificate fails: {type(exc).__name__}: {exc}") from exc
        return cls(signer, issuer=issuer, prompt=prompt)

    @property
    def enabled(self) -> bool:
        return self._signer is not None

    def mark(self, job_id: str) -> str | None:
        """The job's mark as its row records it (12 hex digits); None with provenance off."""
        return None if self._signer is None else f"{mark_of(job_id):012x}"

    def count(self, operation: str, outcome: str) -> None:
        with self._lock:
            self.counts[(operation, outcome)] += 1

    def watermark(self, image: Image.Image, job_id: str) -> Image.Image:
        if self._signer is None:
            return image
        try:
            marked = watermark.embed(image, mark_of(job_id))
        except Exception as exc:  # numpy/Pillow on a strange image: the job fails, never ships unmarked
            self.count("watermark", "failed")
            raise SigningFailed(f"watermarking failed: {type(exc).__name__}: {exc}") from exc
        self.count("watermark", "ok")
        return marked

    def sign(self, data: bytes, fmt: str, claim: Claim) -> bytes:
        if self._signer is None:
            return data
        if not self.prompt:
            claim = Claim(claim.model, claim.when, claim.mark, None, claim.inputs, claim.source)
        try:
            signed = self._signer.sign(data, fmt, claim)
        except Exception as exc:  # c2pa's errors and anything under it: fail the job, clearly
            self.count("sign", "failed")
            raise SigningFailed(f"signing the C2PA manifest failed: {type(exc).__name__}: {exc}") from exc
        self.count("sign", "ok")
        return signed

    def output(
        self,
        image: Image.Image,
        job_id: str,
        *,
        fmt: str,
        quality: int,
        meta: dict[str, object],
        png_level: int,
        model: str,
        prompt: str | None = None,
        inputs: tuple[Ingredient, ...] = (),
        source: Ingredient | None = None,
    ) -> bytes:
        """One output as it is stored: watermarked, encoded with its metadata and XMP, signed. Provenance off:
        encoded only. ``inputs``: an edit's input images; ``source``: an upstream's answer as it came."""
        if self._signer is None:
            return encode_image(image, fmt, quality, meta, png_compress_level=png_level)
        marked = self.watermark(image, job_id)
        packet = xmp(COMPOSITE if inputs else TRAINED)
        data = encode_image(marked, fmt, quality, meta, png_compress_level=png_level, xmp=packet)
        return self.sign(data, fmt, Claim(model, time.time(), mark_of(job_id), prompt, inputs, source))

    def stored(
        self,
        blob: bytes,
        job_id: str,
        *,
        fmt: str,
        quality: int,
        meta: dict[str, object],
        model: str,
        prompt: str | None,
        title: str,
    ) -> tuple[bytes, tuple[int, int]]:
        """Another server's image (an upstream's answer) marked like ours, the provider's own manifest kept as
        its parent ingredient; with its size."""
        image = decode_image(blob, param="upstream result")
        source = Ingredient(blob, file_format(blob, param="upstream result"), title)
        data = self.output(
            image, job_id, fmt=fmt, quality=quality, meta=meta, png_level=1, model=model, prompt=prompt, source=source
        )
        return data, image.size


SOURCE_MARK = "-c2pa"  # an input key ending -c2pa.png has its file as sent beside it (source_key)


def source_key(key: str) -> str:
    """Where an input's file as sent is kept, beside its pixels (only for inputs that carried a manifest)."""
    return key.removesuffix(".png") + ".src"


def ingredient(data: bytes, title: str) -> Ingredient:
    """An input image as a manifest's ingredient (its format read from its header)."""
    return Ingredient(data, file_format(data, param=title), title)
