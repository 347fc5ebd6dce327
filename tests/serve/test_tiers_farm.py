"""OpenAI's tier names on the real farm (`farm up` as is: the embedded models and their built-in tiers),
through the unmodified ``openai`` SDK: models listed by the Serve gateway, a ``sora-2`` clip asked for at
OpenAI's 720x1280 rendered (and decoded) at the tier's 96x128, a ``sora-2-pro`` clip on wan-tiny-2x's
two expert pools, and a batch line under an alias mapped the same way by the leading dispatcher's runner."""

from __future__ import annotations

import io
import json

import av
import pytest

from tests.serve.farmkit import wait_for

pytestmark = pytest.mark.slow


def test_sora_tiers_render_on_the_models_they_map_to(shared_farm) -> None:
    farm = shared_farm
    client = farm.client()
    models = {m.id: m for m in client.models.list()}
    assert (models["sora-2"].alias_of, models["sora-2-pro"].alias_of) == ("wan-tiny", "wan-tiny-2x")

    # What a ported client sends: OpenAI's default size and duration. Few steps keep it cheap.
    video = client.videos.create_and_poll(model="sora-2", prompt="a red fox runs through fresh snow",
                                          size="720x1280", seconds="4", extra_body={"steps": 2, "seed": 3})
    assert video.status == "completed", video.error
    assert (video.model, video.served_model, video.size, video.seconds) == ("sora-2", "wan-tiny", "96x128", "4")
    assert video.mapped_from == {"size": "720x1280", "seconds": None}
    clip = client.videos.download_content(video.id, variant="video").read()
    with av.open(io.BytesIO(clip)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert (stream.codec_context.width, stream.codec_context.height, frames) == (96, 128, 4 * 8 + 1)

    pro = client.videos.create_and_poll(model="sora-2-pro", prompt="a lighthouse in fog", size="1792x1024",
                                        seconds="12", extra_body={"steps": 4, "seed": 5})
    assert pro.status == "completed", pro.error
    assert (pro.model, pro.size, pro.seconds, pro.mapped_from) == (
        "sora-2-pro", "128x96", "4", {"size": "1792x1024", "seconds": "12"})
    pools = {line["pool"] for line in pro.to_dict()["usage"]["by_pool"]}
    assert {"wan-tiny-2x:transformer", "wan-tiny-2x:transformer_2"} <= pools and not any(
        p.startswith("wan-tiny:") for p in pools), pools

    line = {"custom_id": "ported", "method": "POST", "url": "/v1/videos",
            "body": {"model": "sora-2", "prompt": "a paper boat drifting", "size": "1280x720", "seconds": "8",
                     "steps": 2, "seed": 7}}
    uploaded = client.files.create(file=("ported.jsonl", (json.dumps(line) + "\n").encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/videos", completion_window="24h")
    batch = wait_for(lambda: (lambda b: b if b.status in ("completed", "failed", "cancelled", "expired") else None)(
        client.batches.retrieve(batch.id)), 300, interval=0.5, what="the batch to end")
    assert batch.status == "completed", batch
    (output,) = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    body = output["response"]["body"]
    assert (body["model"], body["served_model"], body["size"], body["seconds"], body["mapped_from"]) == (
        "sora-2", "wan-tiny", "128x96", "4", {"size": "1280x720", "seconds": "8"})
