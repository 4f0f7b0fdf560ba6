"""Bad inputs to `convert` and `check-images` give the exact message naming the problem and the fix;
`check-images` with several images says what it does with them."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
from typer.testing import CliRunner

from llava_ultra.cli import app
from llava_ultra.errors import CheckpointError, ConfigError
from llava_ultra.model.convert import convert
from tests.model.test_convert import CLIP, Parts, write_llava


@pytest.fixture(scope="module")
def parts() -> Parts:
    return Parts()


@pytest.fixture(scope="module")
def clip_folder(parts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    parts.clip.save_pretrained(folder)
    return folder


def _truncate(path) -> int:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2


def test_truncated_and_missing_weight_files(parts, clip_folder, tmp_path):
    src = write_llava(parts, tmp_path / "single")
    size = _truncate(src / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=rf"single/model.safetensors \({size} bytes\) is damaged or truncated and cannot be read as "
        r"safetensors \(Error while deserializing header: .*\); re-download or re-copy that file",
    ):
        convert("llava", src, tmp_path / "o1", vision_tower=clip_folder)

    src = write_llava(parts, tmp_path / "sharded", fmt="bin")
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"pytorch_model.bin.index.json lists 2 shard\(s\) but 1 are missing from .*sharded: "
        r"pytorch_model-00002-of-00002.bin; download or copy every shard the index names",
    ):
        convert("llava", src, tmp_path / "o2", vision_tower=clip_folder)
    # sharded safetensors: one shard cut short
    state = dict(parts.llama.state_dict()) | parts.proj
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k].contiguous() for k in part}, str(src / name))
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, part in shards.items() for k in part}})
    )
    for f in src.glob("pytorch_model*"):
        f.unlink()
    _truncate(src / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors \(\d+ bytes\) is damaged"):
        convert("llava", src, tmp_path / "o3", vision_tower=clip_folder)
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"has no weight_map \(tensor name -> shard file\)"):
        convert("llava", src, tmp_path / "o4", vision_tower=clip_folder)


def test_check_images_on_a_truncated_checkpoint(parts, clip_folder, tmp_path):
    src = write_llava(parts, tmp_path / "src")
    convert("llava", src, tmp_path / "out", vision_tower=clip_folder)
    Image.new("RGB", (40, 24), (10, 200, 30)).save(tmp_path / "a.png")
    _truncate(tmp_path / "out" / "model.safetensors")
    result = CliRunner().invoke(
        app, ["check-images", str(tmp_path / "out"), "--image", str(tmp_path / "a.png")]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "model.safetensors" in result.output and "is damaged or truncated" in result.output
    assert "re-download or re-copy that file" in result.output


def test_vision_tower_that_does_not_fit(parts, clip_folder, tmp_path):
    # config.json names a known hub tower; the checkpoint has no tower weights; --vision-tower is another one
    src = write_llava(parts, tmp_path / "named", mm_vision_tower="openai/clip-vit-large-patch14-336")
    with pytest.raises(
        ConfigError,
        match=r"--vision-tower '.*' has hidden_size=24, image_size=32, patch_size=8 but .*config.json was "
        r"trained with mm_vision_tower='openai/clip-vit-large-patch14-336' \(hidden_size=1024, image_size=336, "
        r"patch_size=14\), and the checkpoint holds no tower weights: pass a local copy of "
        r"openai/clip-vit-large-patch14-336",
    ):
        convert("llava", src, tmp_path / "o1", vision_tower=clip_folder)
    # the projector's input width names the tower's width when mm_hidden_size is absent
    wide = tmp_path / "wide_clip"
    CLIPVisionModel(
        CLIPVisionConfig(**(CLIP | {"hidden_size": 16, "intermediate_size": 32}))
    ).save_pretrained(wide)
    src = write_llava(parts, tmp_path / "nohidden")
    config = json.loads((src / "config.json").read_text())
    del config["mm_hidden_size"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError,
        match=r"the projector takes 24-wide features but the CLIP tower '.*wide_clip' has hidden_size=16; "
        r"pass the tower the checkpoint was trained with",
    ):
        convert("llava", src, tmp_path / "o2", vision_tower=wide)
    # tower weights in the checkpoint at another image size than the --vision-tower config
    src = write_llava(parts, tmp_path / "intower", tower=True)
    other = tmp_path / "clip64"
    other.mkdir()
    cfg = json.loads((clip_folder / "config.json").read_text()) | {"image_size": 64}
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError,
        match=r"holds a CLIP tower with hidden_size=24, image_size=32, patch_size=8 but the tower config "
        r".*clip64' says hidden_size=24, image_size=64, patch_size=8; pass --vision-tower with the config",
    ):
        convert("llava", src, tmp_path / "o3", vision_tower=other)


def test_unsupported_image_processor(parts, clip_folder, tmp_path):
    src = write_llava(parts, tmp_path / "src")
    tower = tmp_path / "tower"
    shutil.copytree(clip_folder, tower)
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tower
    )
    with pytest.raises(
        ConfigError,
        match=r"preprocessor_config.json: size shortest_edge=40 \(the tower's image_size is 32\): this "
        r"preprocessing is not supported; llava-ultra reproduces resize of the shortest edge to 32",
    ):
        convert("llava", src, tmp_path / "o1", vision_tower=tower)
    (tower / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "SiglipImageProcessor"})
    )
    with pytest.raises(ConfigError, match=r"image_processor_type='SiglipImageProcessor' is not supported"):
        convert("llava", src, tmp_path / "o2", vision_tower=tower)


def test_check_images_with_several_images_says_what_it_does(parts, clip_folder, tmp_path):
    src = write_llava(parts, tmp_path / "src")
    convert("llava", src, tmp_path / "out", vision_tower=clip_folder)
    paths = []
    for i, colour in enumerate([(200, 10, 10), (10, 10, 200), (90, 90, 90)]):
        paths += ["--image", str(tmp_path / f"f{i}.png")]
        Image.new("RGB", (36 + i, 28), colour).save(tmp_path / f"f{i}.png")
    result = CliRunner().invoke(app, ["check-images", str(tmp_path / "out"), *paths, "--max-tokens", "2"])
    assert result.exit_code == 0, result.output
    # a converted LLaVA has no frame selector: the first image is the one the LLM sees
    assert (
        "3 images of one study; the model feeds 1 of them to its LLM (selector mode 'none', strategy 'first')"
        in (result.output)
    )
    lines = [line for line in result.output.splitlines() if "largest logit change" in line]
    assert len(lines) == 3 and "not looked at" not in lines[0]
    assert lines[1].endswith("(not looked at)") and lines[2].endswith("(not looked at)")


def test_preprocessing_fields_validate_and_old_checkpoints_load(parts, clip_folder, tmp_path):
    from llava_ultra.config import VisionConfig
    from llava_ultra.model.checkpoint import load_checkpoint

    with pytest.raises(
        ConfigError, match=r"model.vision.resize='shortest_edge' is not supported \(did you mean"
    ):
        VisionConfig(inline={"image_size": 336, "patch_size": 14}, resize="shortest_edge")
    with pytest.raises(ConfigError, match=r"model.vision.pad_colour='mean' is not supported"):
        VisionConfig(inline={"image_size": 336, "patch_size": 14}, pad_colour="mean")
    with pytest.raises(ConfigError, match=r"model.vision.resample='cubic' is not supported"):
        VisionConfig(inline={"image_size": 336, "patch_size": 14}, resample="cubic")
    # a checkpoint written before the fields existed loads with the defaults
    convert("llava", write_llava(parts, tmp_path / "src"), tmp_path / "out", vision_tower=clip_folder)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model"]["vision"]["resize"] == "shortest_edge_crop"
    for key in ("resize", "resample", "pad_colour"):
        del config["model"]["vision"][key]
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    model, _ = load_checkpoint(tmp_path / "out")
    v = model.config.vision
    assert (v.resize, v.resample, v.pad_colour) == ("square", "bicubic", "truncate")


def test_processor_configs_as_the_hub_ships_them():
    from llava_ultra.model.convert import preprocessing_from_processor

    # openai/clip-vit-large-patch14-336 (older feature-extractor form: integer sizes)
    openai = {"feature_extractor_type": "CLIPFeatureExtractor", "size": 336, "crop_size": 336, "resample": 3,
              "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}  # fmt: skip
    got = preprocessing_from_processor(openai, 336, "tower", aspect="pad")
    assert (got["image_aspect_ratio"], got["resize"], got["resample"]) == (
        "pad",
        "shortest_edge_crop",
        "bicubic",
    )
    assert preprocessing_from_processor(openai, 336, "tower")["image_aspect_ratio"] == "crop"
    # transformers' LlavaImageProcessor with do_pad: LLaVA's expand2square in front
    llava = {"image_processor_type": "LlavaImageProcessor", "do_pad": True, "size": {"shortest_edge": 336},
             "crop_size": {"height": 336, "width": 336}}  # fmt: skip
    assert preprocessing_from_processor(llava, 336, "hf")["image_aspect_ratio"] == "pad"
    with pytest.raises(
        ConfigError, match=r"hf: size=\{'height': 336, 'width': 336\} \(only \{'shortest_edge': 336\}"
    ):
        preprocessing_from_processor(llava | {"size": {"height": 336, "width": 336}}, 336, "hf")
