"""A tiny LTX-2 (joint audio + video), built offline and saved with ``save_pretrained``: random weights.

The same classes and folder layout as ``Lightricks/LTX-2`` in diffusers' format — Gemma 3 with its
tokenizer, the text connectors, ``LTX2VideoTransformer3DModel``, the video and audio VAEs, the
vocoder and flow-match Euler — at toy sizes, loaded by the same ``from_pretrained`` path real weights
take (:mod:`farm.render.families.ltx2`). The sizes keep the real model's ties (MODEL-NOTES):

- the video VAE compresses 32× in space and 8× in time like the real one, so the registry's LTX-2
  rules (sides of 32k, ``seconds × fps`` a multiple of 8) hold for both;
- Gemma's hidden size = the connectors' heads × head dim = the transformer's ``caption_channels``;
  ``text_proj_in_factor`` = Gemma layers + 1 (the stacked hidden states of every layer);
- the transformer's ``audio_in_channels`` = audio latent channels × latent mel bins
  (``mel_bins / 4``) = the audio VAE's ``base_channels``;
- the vocoder's upsampling product = ``mel_hop_length × output_sampling_rate / sample_rate``
  (160 here: one mel frame is 160 output samples), so a clip's audio is as long as its video
  (about 18 ms shorter: the audio VAE's causal decode; the finisher pads it).

Unlike the tiny Wan VAE (:mod:`farm.render.tiny_vae`), this VAE is not fitted to reconstruct: the
LTX-2 family renders from text only, so nothing here needs an encoder round trip.
"""

from __future__ import annotations

import logging
from pathlib import Path

from farm.render.registry import ModelSpec
from farm.render.tiny import TINY_LTX2_MODEL_ID, save_atomically

log = logging.getLogger(__name__)

TINY_LTX2_FPS = 8  # 1 s = 9 frames = 2 latent frames (8× temporal compression)

# Gemma 3: hidden 32, 2 layers (the stacked states are 32 × 3 wide). The vision tower is required by
# the class and never runs (text only), so it is as small as SigLIP allows.
TINY_GEMMA_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=256,
    sliding_window=64,
)
TINY_GEMMA_VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
)
TINY_CONNECTORS = dict(
    caption_channels=32,
    text_proj_in_factor=TINY_GEMMA_TEXT["num_hidden_layers"] + 1,
    video_connector_num_attention_heads=2,
    video_connector_attention_head_dim=16,
    video_connector_num_layers=1,
    video_connector_num_learnable_registers=None,
    audio_connector_num_attention_heads=2,
    audio_connector_attention_head_dim=16,
    audio_connector_num_layers=1,
    audio_connector_num_learnable_registers=None,
    connector_rope_base_seq_len=64,
    rope_type="split",
)
TINY_LTX2_TRANSFORMER = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=8,
    cross_attention_dim=16,
    audio_in_channels=8,
    audio_out_channels=8,
    audio_num_attention_heads=2,
    audio_attention_head_dim=4,
    audio_cross_attention_dim=8,
    num_layers=2,
    caption_channels=32,
    rope_type="split",
)
# patch 4 × three 2× spatiotemporal stages = 32× in space, 8× in time, as in the real VAE.
TINY_LTX2_VAE = dict(
    latent_channels=8,
    block_out_channels=(8, 8, 8),
    down_block_types=("LTX2VideoDownBlock3D",) * 3,
    decoder_block_out_channels=(8, 8, 8),
    layers_per_block=(1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1),
    spatio_temporal_scaling=(True, True, True),
    decoder_spatio_temporal_scaling=(True, True, True),
    decoder_inject_noise=(False, False, False, False),
    downsample_type=("spatiotemporal",) * 3,
    upsample_type=("spatiotemporal",) * 3,
    upsample_residual=(False, False, False),
    upsample_factor=(1, 1, 1),
    timestep_conditioning=False,
    patch_size=4,
    patch_size_t=1,
)
# 16 kHz, hop 160 (100 mel frames a second, 25 latent frames), 16 mel bins → 4 latent bins × 2 channels.
TINY_LTX2_AUDIO_VAE = dict(
    base_channels=8,
    output_channels=2,
    ch_mult=(1,),
    num_res_blocks=1,
    in_channels=2,
    resolution=32,
    latent_channels=2,
    sample_rate=16000,
    mel_hop_length=160,
    mel_bins=16,
)
TINY_LTX2_VOCODER = dict(
    in_channels=TINY_LTX2_AUDIO_VAE["output_channels"] * TINY_LTX2_AUDIO_VAE["mel_bins"],
    hidden_channels=16,
    out_channels=2,
    upsample_kernel_sizes=[8, 8, 20],
    upsample_factors=[4, 4, 10],
    resnet_kernel_sizes=[3],
    resnet_dilations=[[1, 3]],
    output_sampling_rate=16000,
)


def _build_gemma_tokenizer():
    """A Gemma tokenizer (BPE with byte fallback): the special tokens, the 256 byte tokens and the
    printable ASCII characters, so any UTF-8 prompt (Japanese included) encodes, as bytes where no
    piece matches."""
    from transformers import GemmaTokenizer

    vocab: dict[str, int] = {}
    for token in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"):
        vocab[token] = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "▁" + "".join(chr(c) for c in range(33, 127)):
        vocab.setdefault(char, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=1024)


def _build_text_encoder(vocab_size: int):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=TINY_GEMMA_TEXT | dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=2),
        vision_config=TINY_GEMMA_VISION,
        mm_tokens_per_image=4,
        image_token_index=vocab_size - 1,
        boi_token_index=vocab_size - 2,
        eoi_token_index=vocab_size - 3,
    )
    return Gemma3ForConditionalGeneration(config).eval()


def build_tiny_ltx2(out_dir: Path, *, seed: int = 0) -> Path:
    """Build a tiny ``LTX2Pipeline`` into ``out_dir`` (written beside it and renamed into place)."""
    import torch
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2Pipeline,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _build_gemma_tokenizer()
    pipe = LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95,
                                                  max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096),
        vae=AutoencoderKLLTX2Video(**TINY_LTX2_VAE).eval(),
        audio_vae=AutoencoderKLLTX2Audio(**TINY_LTX2_AUDIO_VAE).eval(),
        text_encoder=_build_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        connectors=LTX2TextConnectors(**TINY_CONNECTORS).eval(),
        transformer=LTX2VideoTransformer3DModel(**TINY_LTX2_TRANSFORMER).eval(),
        vocoder=LTX2Vocoder(**TINY_LTX2_VOCODER).eval(),
    )
    save_atomically(pipe, out_dir, {"family": "ltx2", "variant": "tiny", "experts": 1, "fps": TINY_LTX2_FPS,
                                    "seed": seed})
    log.info("built tiny ltx2 at %s", out_dir)
    return out_dir


def tiny_ltx2_spec(path: Path | str) -> ModelSpec:
    """The registry entry for the tiny LTX-2: sides of 32k up to 128, 1–2 s at 8 fps, few steps."""
    return ModelSpec(
        id=TINY_LTX2_MODEL_ID,
        family="ltx2",
        path=str(path),
        fps=TINY_LTX2_FPS,
        sizes=["64x64", "128x128", "128x96", "96x128"],
        seconds=[1, 2],
        default_steps=4,
        max_steps=50,
        guidance_scale=3.0,
        audio_guidance_scale=5.0,
        max_sequence_length=32,
    )
