"""Reference images of image-to-video requests, kept in the object store for the encoder.

The gateway checks the image (:func:`farm.api.uploads.check_image`), draws the job's id, and stores
the image's bytes as sent under the job's prefix (``videos/<id>/input_reference.<ext>``,
:meth:`farm.storage.s3.ClipLayout.reference`) *before* the job is queued, so the encoder that
starts the job always finds it. Its key goes into the job's params
(:data:`farm.render.registry.REFERENCE_KEY_PARAM`); the encoder reads it back and fits it to the
requested size (:mod:`farm.render.reference`). Deleting the video deletes it with the clip.

When no job ends up owning the stored image — the create was refused (queue full, budget spent,
a reused Idempotency-Key), or it replayed an earlier job with its own id — the gateway deletes it
again (:func:`drop_unowned`), best effort.
"""

from __future__ import annotations

import hashlib
import logging

from farm.api.errors import ServiceUnavailable
from farm.api.uploads import CheckedImage
from farm.storage.s3 import ClipLayout, ObjectStore

log = logging.getLogger(__name__)

REFERENCE_SHA256_PARAM = "input_reference_sha256"  # in the job's params and its request fingerprint


def reference_digest(image: CheckedImage) -> str:
    """The image's SHA-256: part of the request, so a retry with another image is another request."""
    return hashlib.sha256(image.data).hexdigest()


def put_unowned(objects: ObjectStore, key: str, data: bytes, content_type: str, param: str) -> str:
    """Put a request's upload at ``key`` before its job exists; the key. 503 naming ``param`` when the
    store does not answer (nothing was created)."""
    try:
        objects.put_bytes(key, data, content_type)
    except Exception as exc:  # boto3 and the store raise many kinds; the client can only retry
        raise ServiceUnavailable(f"{param}: the object store did not answer ({type(exc).__name__}); "
                                 "nothing was created, retry later", param=param) from None
    return key


def drop_unowned(objects: ObjectStore, key: str) -> None:
    """Delete a stored upload no job owns; a failure is logged (the object is then an orphan)."""
    try:
        objects.delete(key)
    except Exception:
        log.warning("could not delete the unowned upload %s", key, exc_info=True)


def store_reference(objects: ObjectStore, video_id: str, image: CheckedImage) -> str:
    """Put the checked image under ``video_id``'s prefix; its key. 503 when the store does not answer."""
    key, content_type = ClipLayout(video_id).reference(image.format)
    return put_unowned(objects, key, image.data, content_type, "input_reference")
