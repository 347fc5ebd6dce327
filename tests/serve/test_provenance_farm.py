"""Provenance of a derived clip on the real farm: a remix through the unmodified ``openai`` SDK goes
through the dispatcher to the Finisher replica, which reads the source clip from the farm's S3 and
signs it in as the ``parentOf`` ingredient; the downloaded clip's chain is Trusted down to the
original. A remix whose source object is gone from S3 fails with ``source_unavailable``.
"""

from __future__ import annotations

import pytest

from farm.finish import verify_chain
from farm.storage.s3 import ClipLayout
from tests.serve.farmkit import wait_for

pytestmark = pytest.mark.slow


def test_a_derived_job_carries_its_source_as_the_parent_ingredient(shared_farm, tmp_path) -> None:
    farm = shared_farm
    client = farm.client()
    source = client.videos.create_and_poll(model="wan-tiny", prompt="a kite over a beach", size="64x64",
                                           seconds="1", extra_body={"steps": 2, "seed": 21})
    assert source.status == "completed", source.error
    store, objects = farm.store(), farm.objects()

    remix_id = client.videos.remix(source.id, prompt="the kite in a storm", extra_body={"strength": 0.5}).id
    # A second source whose clip is removed from S3 behind the farm's back before it is remixed.
    lost = client.videos.create_and_poll(model="wan-tiny", prompt="a kite at dusk", size="64x64",
                                         seconds="1", extra_body={"steps": 2, "seed": 23})
    assert lost.status == "completed", lost.error
    objects.delete(ClipLayout(lost.id).key("video"))
    gone_id = client.videos.remix(lost.id, prompt="the kite lost", extra_body={"strength": 0.5}).id
    jobs = wait_for(lambda: (lambda js: js if all(j.terminal for j in js) else None)(
        [store.get(remix_id), store.get(gone_id)]), 300, interval=0.5, what="the derived jobs to end")
    remix, gone = jobs

    assert remix.status == "completed", (remix.error_code, remix.error_message)
    clip = objects.download_file(remix.objects["video"], tmp_path / "remix.mp4")
    ca_pem = (farm.home / "c2pa" / "dev-root-ca.pem").read_text()
    report = verify_chain(clip, ca_pem)
    assert report.state == "Trusted", report.lines()
    assert [(link.depth, link.title, link.actions) for link in report.links[1:]] == [
        (1, f"{source.id}.mp4", ("c2pa.created",))
    ]
    assert report.links[0].actions == ("c2pa.opened", "c2pa.edited")

    assert gone.status == "failed" and gone.error_code == "source_unavailable", (gone.status, gone.error_code)
    assert not objects.exists(ClipLayout(gone_id).key("video"))
