"""Finishing chain: visible watermark, H.264 MP4, thumbnail/spritesheet, C2PA signing."""

from farm.finish.chain import ClipMeta, FinishedClip, finish_clip, resolve_signer
from farm.finish.media import (
    SPRITESHEET_MIME,
    THUMBNAIL_MIME,
    VIDEO_MIME,
    VideoInfo,
    encode_mp4,
    frame_rate,
    probe_mp4,
    read_frames,
    top_level_boxes,
    write_spritesheet,
    write_thumbnail,
)
from farm.finish.provenance import (
    TRAINED_ALGORITHMIC_MEDIA,
    DevCredentials,
    ProvenanceInfo,
    SignerConfig,
    VerifyResult,
    build_manifest,
    ensure_dev_credentials,
    sign_mp4,
    verify,
)
from farm.finish.watermark import WatermarkConfig, apply_watermark, render_overlay, watermark_box

__all__ = [
    "SPRITESHEET_MIME",
    "THUMBNAIL_MIME",
    "TRAINED_ALGORITHMIC_MEDIA",
    "VIDEO_MIME",
    "ClipMeta",
    "DevCredentials",
    "FinishedClip",
    "ProvenanceInfo",
    "SignerConfig",
    "VerifyResult",
    "VideoInfo",
    "WatermarkConfig",
    "apply_watermark",
    "build_manifest",
    "encode_mp4",
    "ensure_dev_credentials",
    "finish_clip",
    "frame_rate",
    "probe_mp4",
    "read_frames",
    "render_overlay",
    "resolve_signer",
    "sign_mp4",
    "top_level_boxes",
    "verify",
    "watermark_box",
    "write_spritesheet",
    "write_thumbnail",
]
