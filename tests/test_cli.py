"""The farm CLI: bad input is refused with one line and nothing written; a real render end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from farm.cli import main


@pytest.fixture
def farm_home(tmp_path, monkeypatch):
    home = tmp_path / "farm-home"
    monkeypatch.setenv("FARM_HOME", str(home))
    return home


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["render", ""], "prompt: must not be empty"),
        (["render", "   "], "prompt: must not be empty"),
        (["render", "cat", "--size", "100x100"], "size: '100x100' is not supported"),
        (["render", "cat", "--size", "banana"], "allowed: 64x64"),
        (["render", "cat", "--seconds", "9"], "seconds: 9 is not supported"),
        (["render", "cat", "--seconds", "0"], "allowed: 1, 2, 3, 4"),
        (["render", "cat", "--steps", "0"], "steps: 0 is out of range; allowed: 1..50"),
        (["render", "cat", "--steps", "51"], "allowed: 1..50"),
        (["render", "cat", "--model", "sora-9"], "model: 'sora-9' is not served here"),
        (["render", "cat", "--scheduler", "ddim"], "scheduler: 'ddim' is not supported by model 'wan-tiny'; allowed: unipc, flow-euler"),
        (["render", "cat", "--steps", "4", "--shard-steps", "5"], "--shard-steps: 5 is out of range"),
        (["render", "cat", "--out", "/nonexistent-dir/clip.mp4"], "does not exist"),
        (["render", "cat", "--out", "/etc/hostname/clip.mp4"], "does not exist"),
        (["render", "cat", "--out", "/proc/clip.mp4"], "cannot write to folder"),
        (["render", "cat", "--out", "clip.avi"], "must end in .mp4"),
    ],
)
def test_bad_render_input_is_one_line_exit_2_and_writes_nothing(argv, needle, farm_home, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("farm: error: ") and needle in lines[0], lines[0]
    # Nothing written: no state folder, no model built, no S3 server started.
    assert not farm_home.exists()


def test_out_that_is_a_folder_is_refused(tmp_path, farm_home, capsys):
    folder = tmp_path / "x.mp4"
    folder.mkdir()
    assert main(["render", "cat", "--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_model_init_refuses_unknown_kind(tmp_path, capsys):
    assert main(["model", "init", "huge", "--out", str(tmp_path / "m")]) == 2
    assert "allowed: tiny" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_model_init_builds_the_tiny_image_to_video_model(tmp_path, capsys):
    import json

    from farm.render.tiny import is_built

    assert main(["model", "init", "tiny-i2v", "--out", str(tmp_path / "x"), "--experts", "2"]) == 2
    assert "--experts: 2 is not buildable for tiny-i2v" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["model", "init", "tiny-i2v", "--out", str(tmp_path / "m")]) == 0
    assert is_built(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["image_encoder"][1] == "CLIPVisionModel"


def test_model_init_builds_the_tiny_ltx2_model(tmp_path, capsys):
    import json

    from farm.render.tiny import build_tiny_by_id, is_built, is_tiny_id

    assert main(["model", "init", "tiny-ltx2", "--out", str(tmp_path / "x"), "--experts", "2"]) == 2
    assert "--experts: 2 is not buildable for tiny-ltx2" in capsys.readouterr().err
    assert main(["model", "init", "tiny-ltx2", "--out", str(tmp_path / "m")]) == 0
    assert is_built(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "LTX2Pipeline" and index["vocoder"][1] == "LTX2Vocoder"
    assert index["audio_vae"][1] == "AutoencoderKLLTX2Audio" and index["text_encoder"][1] == "Gemma3ForConditionalGeneration"
    assert is_tiny_id("ltx2-tiny")  # `farm up` builds it on first use, like the Wan ones
    assert (build_tiny_by_id("ltx2-tiny", tmp_path / "by-id") / "model_index.json").is_file()


def test_model_init_builds_the_tiny_ti2v_model(tmp_path, capsys):
    import json

    from farm.render.tiny import is_built, is_tiny_id

    assert main(["model", "init", "tiny-ti2v", "--out", str(tmp_path / "x"), "--experts", "2"]) == 2
    assert "--experts: 2 is not buildable for tiny-ti2v" in capsys.readouterr().err
    assert main(["model", "init", "tiny-ti2v", "--out", str(tmp_path / "m")]) == 0
    assert is_built(tmp_path / "m") and is_tiny_id("wan-tiny-ti2v")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline" and index["expand_timesteps"] is True
    assert (index.get("image_encoder") or [None])[0] is None


def _farm(*args: str, env: dict) -> subprocess.CompletedProcess:
    farm = Path(sys.executable).parent / "farm"
    return subprocess.run([str(farm), *args], env=env, capture_output=True, text=True, timeout=300)


def test_render_end_to_end_through_real_s3(tmp_path):
    """`farm render` with a Japanese prompt: MP4 in real SeaweedFS, local copy plays and verifies."""
    from farm.config import load_settings
    from farm.finish.media import probe_mp4
    from farm.storage.connect import open_store
    from farm.storage.s3 import ClipLayout

    home = tmp_path / "home"
    env = {**os.environ, "FARM_HOME": str(home), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "clip.mp4"
    try:
        done = _farm(
            "render", "雪の降る森の中を赤いキツネが走る", "--size", "64x64", "--seconds", "1",
            "--steps", "4", "--seed", "3", "--shard-steps", "2", "--out", str(out), "--quiet", env=env,
        )
        assert done.returncode == 0, done.stderr
        fields = dict(line.split(":", 1) for line in done.stdout.strip().splitlines())
        video_id, uri = fields["video_id"].strip(), fields["s3"].strip()
        assert uri == f"s3://videofarm/videos/{video_id}/video.mp4"

        info = probe_mp4(out)
        assert (info.frames, info.width, info.height, float(info.fps)) == (9, 64, 64, 8.0)
        verified = _farm("verify", str(out), env=env)
        assert verified.returncode == 0 and "c2pa:  Trusted" in verified.stdout, verified.stdout + verified.stderr

        settings = load_settings().model_copy(update={"state_dir": home})
        store = open_store(settings, start=False)
        layout = ClipLayout(video_id)
        keys = set(store.list_keys(layout.prefix))
        assert {layout.key("video"), layout.key("thumbnail"), layout.key("spritesheet"), layout.record_key} <= keys
        assert store.get_bytes(layout.key("video")) == out.read_bytes()
        record = store.get_json(layout.record_key)
        assert record["prompt"] == "雪の降る森の中を赤いキツネが走る" and record["seed"] == 3
        assert record["shards"] == 2 and set(record["timings_s"]) >= {"encode", "denoise", "decode", "finish"}
    finally:
        stopped = _farm("storage", "stop", env=env)
        assert stopped.returncode == 0, stopped.stderr


def test_render_image_is_refused_for_a_text_model_and_unreadable_files(tmp_path, farm_home, capsys):
    image = tmp_path / "ref.png"
    image.write_bytes(b"not a png")
    assert main(["render", "cat", "--image", str(image)]) == 2
    assert "--image: model 'wan-tiny' renders from text only" in capsys.readouterr().err
    assert not farm_home.exists()
