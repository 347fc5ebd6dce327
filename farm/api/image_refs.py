"""``input_reference`` by file id or by URL: where the image's bytes come from before the checks.

The SDK's JSON shapes of ``input_reference`` are ``{"file_id": …}`` — a file the caller uploaded with
``client.files.create(file=…, purpose="vision")`` (or ``"user_data"``) — and ``{"image_url": …}`` — a
base64 data URL, or an http(s) URL the gateway fetches. Whichever way the bytes arrive, they then
pass the same checks (:func:`farm.api.uploads.check_image`) and are stored the same way
(:mod:`farm.api.references`) as an image sent as a multipart file part.

Fetching a URL a tenant chose is a request the tenant aims from inside the farm, so it goes through
the webhook SSRF guard (:class:`farm.webhooks.guard.UrlGuard`): the host is resolved and only a
public unicast address — or one the operator lists in ``serve.image_url_allow_hosts`` — is connected
to, pinned (the checked IP, the original ``Host``), and every redirect hop is checked again. The
body is read in chunks and abandoned once it passes the byte limit; the whole fetch (DNS, connect,
redirects, body) has one deadline. Every failure is a 400 naming ``input_reference`` that says why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from starlette.concurrency import run_in_threadpool

from farm.api.errors import InvalidRequest, ServiceUnavailable
from farm.storage.s3 import ObjectNotFound
from farm.webhooks.guard import UrlGuard, UrlRefused, pinned_request

if TYPE_CHECKING:
    from farm.api.schemas import ImageReference
    from farm.jobs.batches import BatchStore
    from farm.storage.s3 import ObjectStore

PARAM = "input_reference"
# Files whose bytes may be an input_reference: OpenAI's purposes for images (vision) and for files
# meant as model input (user_data). The Files API here accepts both only as images (batch_routes).
IMAGE_PURPOSES = ("vision", "user_data")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
USER_AGENT = "videofarm-image-fetch"


def is_data_url(url: str) -> bool:
    return url[:5].lower() == "data:"


def needs_fetching(reference: ImageReference) -> bool:
    """A file id or a remote URL: bytes the gateway must read first (a data URL carries its own)."""
    return reference.file_id is not None or (reference.image_url is not None and not is_data_url(reference.image_url))


@dataclass(frozen=True)
class ImageFetch:
    """Limits of fetching an ``image_url`` (``serve.image_url_*`` in the settings)."""

    allow_hosts: tuple[str, ...] = ()  # CIDRs and host names the SSRF guard lets through
    max_bytes: int = 10 * 1024 * 1024
    timeout_s: float = 10.0
    max_redirects: int = 3

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError(f"ImageFetch: max_bytes must be >= 1, timeout_s > 0 and max_redirects >= 0, got {self}")


def _refused(why: str, code: str) -> InvalidRequest:
    return InvalidRequest(f"{PARAM}: {why}", param=PARAM, code=code)


class ImageSources:
    """Reads the bytes of a ``file_id`` or ``image_url`` reference for its caller."""

    def __init__(self, fetch: ImageFetch, files: BatchStore | None, objects: Callable[[], ObjectStore],
                 max_bytes: int) -> None:
        # The fetch stops at the smaller limit, so a fetched image is refused here, with the URL's
        # own reasons, rather than by the upload check after it was read.
        self.fetch, self.files, self.objects = fetch, files, objects
        self.max_bytes = min(fetch.max_bytes, max_bytes)
        self.guard = UrlGuard(fetch.allow_hosts, subject="input_reference image URLs",
                              setting="serve.image_url_allow_hosts")

    async def bytes_of(self, reference: ImageReference, owner: str | None) -> bytes:
        if reference.file_id is not None:
            return await self.file_bytes(reference.file_id, owner)
        return await self.fetch_url(reference.image_url or "")

    # -- by file id ----------------------------------------------------------------------------

    async def file_bytes(self, file_id: str, owner: str | None) -> bytes:
        """The bytes of ``owner``'s file ``file_id``; another account's file reads as one that never
        existed (400 ``file_not_found``)."""
        if self.files is None:
            raise _refused("this farm serves no Files API, so file ids cannot be read; send the image as a file "
                           "part or an image_url", "unsupported_parameter")
        record = await run_in_threadpool(self.files.get_file, file_id, owner)
        if record is None:
            raise _refused(f"file {file_id!r} not found; upload it with POST /v1/files (purpose vision)",
                           "file_not_found")
        if record.purpose not in IMAGE_PURPOSES:
            raise _refused(f"file {file_id!r} has purpose {record.purpose!r}; allowed: {', '.join(IMAGE_PURPOSES)}",
                           "invalid_file_purpose")
        try:
            return await run_in_threadpool(lambda: self.objects().get_bytes(record.key))
        except ObjectNotFound:
            raise _refused(f"the content of file {file_id!r} is not stored", "file_not_found") from None
        except Exception as exc:  # boto3 and the store raise many kinds; the client can only retry
            raise ServiceUnavailable(f"{PARAM}: the object store did not answer ({type(exc).__name__}); nothing "
                                     "was created, retry later", param=PARAM) from None

    # -- by URL ----------------------------------------------------------------------------------

    async def fetch_url(self, url: str) -> bytes:
        """GET ``url`` through the SSRF guard within the time and byte limits; the body's bytes."""
        limit_s = self.fetch.timeout_s
        try:
            async with asyncio.timeout(limit_s), self._client() as client:
                return await self._follow(client, url)
        except UrlRefused as exc:
            raise _refused(f"image_url {exc}", "image_url_refused") from None
        except (TimeoutError, httpx.TimeoutException):
            raise _refused(f"fetching image_url timed out after {limit_s:g} s (serve.image_url_timeout_s)",
                           "image_url_timeout") from None
        except httpx.InvalidURL as exc:  # e.g. a Location header httpx cannot parse
            raise _refused(f"image_url redirected to an invalid URL ({exc})", "image_url_unreachable") from None
        except httpx.HTTPError as exc:
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise _refused(f"image_url could not be fetched ({detail})", "image_url_unreachable") from None

    def _client(self) -> httpx.AsyncClient:
        # As for webhooks: no environment proxy (it would connect to the name, not the checked IP), no
        # automatic redirects (each hop passes the guard), no pooled connections (a TLS connection is
        # keyed by IP; reusing it for another name at that IP would skip that name's certificate check).
        return httpx.AsyncClient(timeout=httpx.Timeout(self.fetch.timeout_s), follow_redirects=False, trust_env=False,
                                 limits=httpx.Limits(max_keepalive_connections=0),
                                 headers={"User-Agent": USER_AGENT, "Accept": "image/png, image/jpeg, image/webp",
                                          "Accept-Encoding": "identity"})

    async def _follow(self, client: httpx.AsyncClient, url: str) -> bytes:
        current: str | httpx.URL = url
        for _hop in range(self.fetch.max_redirects + 1):
            target = await self.guard.resolve(current)
            response = await client.send(pinned_request(client, "GET", target, content=b"", headers={}), stream=True)
            try:
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    current = target.url.join(location)
                    continue
                if response.status_code != 200:
                    raise _refused(f"image_url answered HTTP {response.status_code}; it must answer 200 with the "
                                   "image", "image_url_unreachable")
                return await self._body(response)
            finally:
                await response.aclose()
        raise _refused(f"image_url redirected more than {self.fetch.max_redirects} times", "image_url_unreachable")

    async def _body(self, response: httpx.Response) -> bytes:
        too_big = _refused(f"the image at image_url is larger than {self.max_bytes} bytes; allowed: at most "
                           f"{self.max_bytes} (serve.image_url_max_mb, serve.max_upload_mb)", "image_too_large")
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise too_big  # refused before a byte of the body is read
        data = bytearray()
        async for chunk in response.aiter_bytes(_CHUNK):  # decoded bytes are what is counted
            data += chunk
            if len(data) > self.max_bytes:  # a missing or lying Content-Length
                raise too_big
        return bytes(data)


__all__ = ["IMAGE_PURPOSES", "ImageFetch", "ImageSources", "is_data_url", "needs_fetching"]
