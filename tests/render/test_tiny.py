"""The tiny models load through the same from_pretrained path real weights take."""

from __future__ import annotations

import json

from farm.render.engine import ModelLayout
from farm.render.tiny import TWO_EXPERT_BOUNDARY_RATIO, is_built


def test_tiny_model_loads_with_from_pretrained(tiny_model_dir):
    from diffusers import WanPipeline

    assert is_built(tiny_model_dir)
    pipe = WanPipeline.from_pretrained(tiny_model_dir)
    assert pipe.transformer is not None and pipe.transformer_2 is None
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "flow_prediction"
    # Fresh modules start in train mode; saved-and-loaded ones must not carry dropout into inference.
    assert not pipe.transformer.training and not pipe.text_encoder.training


def test_tokenizer_round_trips_japanese_and_english(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    for text in ["桜の花びらが舞う京都の路地", "a red fox in fresh snow", "絵文字も🎬 mixed テキスト"]:
        ids = tokenizer(text).input_ids
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_two_expert_layout(tiny_model_2x_dir):
    index = json.loads((tiny_model_2x_dir / "model_index.json").read_text())
    assert index["boundary_ratio"] == TWO_EXPERT_BOUNDARY_RATIO
    assert index["transformer_2"][1] == "WanTransformer3DModel"
    layout = ModelLayout.read(str(tiny_model_2x_dir))
    assert layout.experts == ("transformer", "transformer_2")
    assert (layout.scale_spatial, layout.scale_temporal) == (8, 4)
