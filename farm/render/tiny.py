"""Tiny Wan-family models, built offline and saved with ``save_pretrained``: random weights, but
for the VAE, which is set to reconstruct images (:mod:`farm.render.tiny_vae`).

The build machines have no model hub, so tests and the demo use models this module
makes. They are real diffusers/transformers classes at toy sizes, saved in the same
layout as ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (:func:`build_tiny_wan`) or
``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` (:func:`build_tiny_wan_i2v`), and loaded by the
same ``from_pretrained`` path real weights take. Real weights are a config change.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from farm.render.registry import ModelSpec

log = logging.getLogger(__name__)

# Text the byte-level BPE learns merges from. Bytes cover every character anyway;
# the corpus only makes common English and Japanese pieces single tokens.
_TOKENIZER_CORPUS = [
    "a cat walks along a sunny beach at golden hour, cinematic, 4k",
    "a red fox runs through fresh snow in a quiet forest",
    "timelapse of clouds over a mountain lake, soft light",
    "a robot paints a portrait in a busy studio, handheld camera",
    "city street at night with neon signs and rain reflections",
    "桜の花びらが舞う京都の古い路地を猫が歩く、映画のような映像",
    "夕焼けの海辺を走る犬、スローモーション",
    "雪の降る森の中を赤いキツネが走る",
    "東京の夜の街、ネオンと雨の反射、シネマティック",
    "山の湖の上を流れる雲のタイムラプス、柔らかい光",
    "ロボットが忙しいアトリエで肖像画を描く",
]
TINY_VOCAB_SIZE = 1024
TINY_FPS = 8

# One source for the tiny shapes, so tests and docs agree with the builder.
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)
# base_dim 4 with dim_mult [1, 2, 2, 2], not base_dim 3 with [1, 1, 1, 1]: the VAE is set to
# reconstruct images (farm.render.tiny_vae), which needs four channels everywhere on the way, and the
# decoder's upsamplers halve theirs. The narrowest such choice; measured, its decode at 256² × 33
# frames takes 6.4 s on one thread (3.6 s before; base_dim 8 with [1, 1, 1, 1]: 11 s).
TINY_VAE = dict(
    base_dim=4,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)
TWO_EXPERT_BOUNDARY_RATIO = 0.875  # Wan 2.2 A14B T2V
# Wan 2.1 I2V: the transformer also takes the 20-channel condition (16 + 20 = 36 input channels)
# and cross-attends to the image encoder's tokens (image_dim = the CLIP hidden size; the added
# key/value projections map them to the attention's inner size, heads × head dim = 24).
TINY_I2V_TRANSFORMER = TINY_TRANSFORMER | dict(in_channels=36, image_dim=32, added_kv_proj_dim=24)
TINY_IMAGE_ENCODER = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)
TINY_I2V_MODEL_ID = "wan-tiny-i2v"
# Wan 2.2 TI2V: a text-to-video-sized transformer (16 input channels: no condition channels, no image
# cross-attention); the image enters as the first latent frame.
TINY_TI2V_MODEL_ID = "wan-tiny-ti2v"


def _build_tokenizer():
    """A byte-level BPE trained on the fly: handles any UTF-8, Japanese included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    # UMT5 appends </s>, as the real Wan tokenizer does.
    from tokenizers import processors

    eos_id = core.token_to_id("</s>")
    core.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def _build_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def _build_scheduler():
    from diffusers import UniPCMultistepScheduler

    # The Wan default: multistep UniPC over shifted flow-matching sigmas.
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )


def build_tiny_wan(out_dir: Path, *, experts: int = 1, seed: int = 0) -> Path:
    """Build a tiny Wan T2V pipeline (``experts=2``: Wan 2.2 A14B layout) into ``out_dir``.

    The folder is written next to its destination and renamed into place, so a
    crash never leaves a half-written model that later loads.
    """
    from diffusers import WanPipeline, WanTransformer3DModel

    from farm.render.tiny_vae import reconstructing_vae

    if experts not in (1, 2):
        raise ValueError(f"experts must be 1 or 2, got {experts}")
    import torch

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _build_tokenizer()
    text_encoder = _build_text_encoder(len(tokenizer))
    vae = reconstructing_vae(TINY_VAE)
    transformer = WanTransformer3DModel(**TINY_TRANSFORMER).eval()
    extra = {}
    if experts == 2:
        extra = dict(
            transformer_2=WanTransformer3DModel(**TINY_TRANSFORMER).eval(),
            boundary_ratio=TWO_EXPERT_BOUNDARY_RATIO,
        )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_build_scheduler(),
        **extra,
    )
    save_atomically(pipe, out_dir, {"family": "wan", "variant": "tiny", "experts": experts, "fps": TINY_FPS, "seed": seed})
    log.info("built tiny wan (%d expert(s)) at %s", experts, out_dir)
    return out_dir


def build_tiny_wan_i2v(out_dir: Path, *, seed: int = 0) -> Path:
    """Build a tiny Wan 2.1 image-to-video pipeline (``WanImageToVideoPipeline``) into ``out_dir``.

    The text side (tokenizer, UMT5, VAE, scheduler) is the text-to-video model's; it adds a
    CLIP vision encoder with its image processor (32×32 input, 17 tokens of width 32) and a
    36-channel transformer with image cross-attention. Written next to its destination and
    renamed into place, like :func:`build_tiny_wan`.
    """
    import torch
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from farm.render.tiny_vae import reconstructing_vae

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _build_tokenizer()
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_build_text_encoder(len(tokenizer)),
        vae=reconstructing_vae(TINY_VAE),
        transformer=WanTransformer3DModel(**TINY_I2V_TRANSFORMER).eval(),
        scheduler=_build_scheduler(),
        image_encoder=CLIPVisionModel(CLIPVisionConfig(**TINY_IMAGE_ENCODER)).eval(),
        # CLIP's own preprocessing (resize the short side, center-crop, normalize) at the tiny size.
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": TINY_IMAGE_ENCODER["image_size"]},
            crop_size={"height": TINY_IMAGE_ENCODER["image_size"], "width": TINY_IMAGE_ENCODER["image_size"]},
        ),
    )
    save_atomically(pipe, out_dir, {"family": "wan-i2v", "variant": "tiny", "experts": 1, "fps": TINY_FPS, "seed": seed})
    log.info("built tiny wan i2v at %s", out_dir)
    return out_dir


def build_tiny_wan_ti2v(out_dir: Path, *, seed: int = 0) -> Path:
    """Build a tiny Wan 2.2 TI2V-style pipeline (``WanImageToVideoPipeline`` with ``expand_timesteps``,
    no image encoder) into ``out_dir``: the text-to-video model's tokenizer, UMT5, VAE, scheduler and
    transformer shape. Written next to its destination and renamed into place."""
    import torch
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from farm.render.tiny_vae import reconstructing_vae

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _build_tokenizer()
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_build_text_encoder(len(tokenizer)),
        vae=reconstructing_vae(TINY_VAE),
        transformer=WanTransformer3DModel(**TINY_TRANSFORMER).eval(),
        scheduler=_build_scheduler(),
        expand_timesteps=True,
    )
    save_atomically(pipe, out_dir, {"family": "wan-ti2v", "variant": "tiny", "experts": 1, "fps": TINY_FPS,
                                    "seed": seed})
    log.info("built tiny wan ti2v at %s", out_dir)
    return out_dir


def save_atomically(pipe, out_dir: Path, meta: dict) -> None:
    """save_pretrained into a staging folder beside ``out_dir``, then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        pipe.save_pretrained(staging)
        (staging / "videofarm.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def is_built(path: Path) -> bool:
    """True when ``path`` holds a complete saved pipeline."""
    return (Path(path) / "model_index.json").is_file() and (Path(path) / "videofarm.json").is_file()


TINY_MODEL_IDS = {1: "wan-tiny", 2: "wan-tiny-2x"}


# The tiny LTX-2's id (its builder is farm.render.tiny_ltx2, imported only when it is built).
TINY_LTX2_MODEL_ID = "ltx2-tiny"


def is_tiny_id(model_id: str) -> bool:
    """True for the ids of the tiny models built here or in :mod:`farm.render.tiny_ltx2`."""
    return model_id in TINY_MODEL_IDS.values() or model_id in (TINY_I2V_MODEL_ID, TINY_TI2V_MODEL_ID,
                                                                 TINY_LTX2_MODEL_ID)


def build_tiny_by_id(model_id: str, out_dir: Path) -> Path:
    """Build the tiny model called ``model_id`` (see :func:`is_tiny_id`) into ``out_dir``; ValueError otherwise."""
    if model_id == TINY_I2V_MODEL_ID:
        return build_tiny_wan_i2v(out_dir)
    if model_id == TINY_TI2V_MODEL_ID:
        return build_tiny_wan_ti2v(out_dir)
    if model_id == TINY_LTX2_MODEL_ID:
        from farm.render.tiny_ltx2 import build_tiny_ltx2

        return build_tiny_ltx2(out_dir)
    experts = {v: k for k, v in TINY_MODEL_IDS.items()}.get(model_id)
    if experts is None:
        raise ValueError(f"model {model_id!r} is not a tiny model; tiny ones: "
                         f"{', '.join([*TINY_MODEL_IDS.values(), TINY_I2V_MODEL_ID, TINY_TI2V_MODEL_ID, TINY_LTX2_MODEL_ID])}")
    return build_tiny_wan(out_dir, experts=experts)


def tiny_spec(path: Path | str, experts: int = 1) -> ModelSpec:
    """The registry entry for a tiny model: small sizes, 8 fps, few steps."""
    return ModelSpec(
        id=TINY_MODEL_IDS[experts],
        experts=experts,
        path=str(path),
        fps=TINY_FPS,
        sizes=["64x64", "128x128", "256x256", "128x96", "96x128"],
        seconds=[1, 2, 3, 4],
        default_steps=8,
        max_steps=50,
        guidance_scale=5.0,
        guidance_scale_2=3.0 if experts == 2 else None,
        max_sequence_length=64,
    )


def tiny_i2v_spec(path: Path | str) -> ModelSpec:
    """The registry entry for the tiny image-to-video model: sizes up to 128², 8 fps, few steps.

    ``max_sequence_length`` is 512: Wan 2.1 I2V's attention takes the text to be 512 tokens.
    """
    return ModelSpec(
        id=TINY_I2V_MODEL_ID,
        family="wan-i2v",
        path=str(path),
        fps=TINY_FPS,
        sizes=["64x64", "128x128", "128x96", "96x128"],
        seconds=[1, 2],
        default_steps=8,
        max_steps=50,
        guidance_scale=5.0,
        max_sequence_length=512,
    )


def tiny_ti2v_spec(path: Path | str) -> ModelSpec:
    """The registry entry for the tiny Wan 2.2 TI2V-style model: sides of 32k up to 128, 1–2 s at 8 fps."""
    return ModelSpec(
        id=TINY_TI2V_MODEL_ID,
        family="wan-ti2v",
        path=str(path),
        fps=TINY_FPS,
        sizes=["64x64", "128x128", "128x96", "96x128"],
        seconds=[1, 2],
        default_steps=8,
        max_steps=50,
        guidance_scale=5.0,
        max_sequence_length=64,
    )
