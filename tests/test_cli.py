"""The generated CLI: every command's help, help text for every option, and each override form.

The override tests build the real commands' options dataclasses through `cli_args.build` (what
the commands do before running), and check one end-to-end run per form family through
`llava-ultra synth`, the cheapest command.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llava_ultra.cli import COMMANDS, app
from llava_ultra.cli_args import HelpRequested, attribute_docs, build, options_of
from llava_ultra.config import Config
from llava_ultra.errors import ConfigError

RUNNER = CliRunner()


def parse(name: str, *args: str):
    cmd = COMMANDS[name]
    cls, _ = cmd.loader()
    return build(
        cls, list(args), aliases=cmd.aliases, env=cmd.env, defaults=cmd.defaults, training=cmd.training
    )


# ----------------------------------------------------------------------------------- help


def test_top_level_help_lists_every_command() -> None:
    result = RUNNER.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_renders(name: str) -> None:
    result = RUNNER.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: llava-ultra {name}")
    for option in options_of(COMMANDS[name].options()):
        if option.kind != "positional" and option.name != COMMANDS[name].training:
            assert option.help.splitlines()[0][:40] in result.output.replace("\n      ", " ")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_text(name: str) -> None:
    missing = [o.name for o in options_of(COMMANDS[name].options()) if not o.help.strip()]
    assert not missing, f"{name}: fields without an attribute docstring: {missing}"


def test_every_training_config_field_has_help_text() -> None:
    missing = [o.name for o in options_of(Config) if not o.help.strip()]
    assert not missing, f"Config fields without an attribute docstring: {missing}"


def test_training_commands_list_the_config_keys_in_their_help() -> None:
    output = RUNNER.invoke(app, ["train", "--help"]).output
    assert "--train.stage2.lr" in output and "--model.vision.path" in output


def test_attribute_docs_reads_the_string_below_each_field() -> None:
    docs = attribute_docs(Config)
    assert set(docs) == {"model", "train", "data"} and docs["model"].startswith("The model")


# ------------------------------------------------------------------------------ overrides


@pytest.mark.parametrize(
    "args",
    [["--reports", "5"], ["--reports=5"], ["reports=5"]],
    ids=["space", "equals", "bare"],
)
def test_option_value_forms(args: list[str]) -> None:
    opts = parse("synth", "--out", "x", *args)
    assert opts.synth.reports == 5 and opts.out == Path("x")


@pytest.mark.parametrize(
    "args",
    [
        ["--llm.base_url", "http://h/v1"],
        ["--llm.base-url=http://h/v1"],
        ["llm.base_url=http://h/v1"],
        ["--llm-base-url", "http://h/v1"],
    ],
    ids=["dotted", "dotted-equals", "dotted-bare", "joined-with-dashes"],
)
def test_dotted_section_forms(args: list[str]) -> None:
    opts = parse("instruct", "--reports", "r", "--out", "o", *args)
    assert opts.llm.base_url == "http://h/v1"


def test_underscores_and_dashes_are_the_same_name() -> None:
    assert parse("synth", "--out", "x", "--image_size", "64").synth.image_size == 64
    assert parse("synth", "--out", "x", "--image-size", "64").synth.image_size == 64


@pytest.mark.parametrize(
    "args, hard",
    [
        ([], False),
        (["--hard"], True),
        (["--no-hard"], False),
        (["--hard=false"], False),
        (["--hard", "yes"], True),
    ],
)
def test_boolean_forms(args: list[str], hard: bool) -> None:
    assert parse("synth", "--out", "x", *args).synth.hard is hard


def test_lists_repeat_or_take_a_comma_list() -> None:
    repeated = parse("check-images", "ckpt", "--image", "a.png", "--image", "b,c.png")
    assert repeated.image == [Path("a.png"), Path("b,c.png")]  # paths are never split
    assert tuple(parse("ablate", "--out", "o", "--seeds", "0,1", "--seeds", "5").ablate.seeds) == (0, 1, 5)
    assert parse("judge", "--pred", "p", "--ref", "r", "--out", "o", "--base-url", "http://h", "--model", "m",
                 "--price", "0.5,2").client.price == (0.5, 2.0)  # fmt: skip


def test_config_file_then_flags_override_it(tmp_path: Path) -> None:
    path = tmp_path / "instruct.yaml"
    path.write_text(
        yaml.safe_dump({"seed": 3, "language": "zh", "llm": {"model": "m1", "concurrency": 2}}),
        encoding="utf-8",
    )
    opts = parse("instruct", "--reports", "r", "--out", "o", "--config", str(path), "--llm.model", "m2")
    assert (opts.seed, opts.language, opts.llm.concurrency, opts.llm.model) == (3, "zh", 2, "m2")
    path.write_text("sed: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown option --sed; did you mean --seed"):
        parse("instruct", "--reports", "r", "--out", "o", "--config", str(path))


def test_environment_fills_an_option_the_command_line_beats_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAVA_ULTRA_JUDGE_MODEL", "from-env")
    monkeypatch.setenv("LLAVA_ULTRA_LLM_BASE_URL", "http://env/v1")
    base = ["--pred", "p", "--ref", "r", "--out", "o"]
    assert parse("judge", *base).client.model == "from-env"
    assert parse("judge", *base, "--judge-model", "flag").client.model == "flag"
    assert parse("judge", *base).client.timeout == 120.0  # the command's default, not ClientConfig's


def test_training_overrides_in_every_form_are_checked_against_the_config() -> None:
    opts = parse(
        "train",
        "--config",
        "c.yaml",
        "--train.stage2.lr",
        "1e-4",
        "--train.seed=3",
        "data.num_workers=2",
        "--resume",
    )
    assert opts.overrides == ["train.stage2.lr=1e-4", "train.seed=3", "data.num_workers=2"] and opts.resume
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        parse("train", "--config", "c.yaml", "--train.stage1.lrr", "1e-4")
    quick = parse("quickstart", "--fast", "--train.stage2.max_steps", "3")
    assert quick.quickstart.overrides == ["train.stage2.max_steps=3"] and quick.quickstart.out == Path(
        "runs/demo"
    )


def test_positional_arguments_and_aliases() -> None:
    opts = parse("score", "preds.jsonl", "gt.json", "--mode", "llava-med")
    assert (opts.predictions, opts.ground_truth, opts.settings.mode) == (
        Path("preds.jsonl"),
        "gt.json",
        "llava-med",
    )
    conv = parse("convert", "--from", "llava", "--src", "s", "--out", "o", "--set", "dtype=float32")
    assert conv.source == "llava" and conv.overrides == ["dtype=float32"]
    assert parse("validate", "d", "--all", "--no-decode").all_problems is True


def test_errors_name_the_option_and_the_fix() -> None:
    with pytest.raises(ConfigError, match="did you mean --reports"):
        parse("synth", "--out", "x", "--report", "5")
    with pytest.raises(ConfigError, match="missing --out"):
        parse("synth")
    with pytest.raises(ConfigError, match="--reports needs a value"):
        parse("synth", "--out", "x", "--reports")
    with pytest.raises(ConfigError, match="must be int"):
        parse("synth", "--out", "x", "--reports", "many")
    with pytest.raises(ConfigError, match="seeds must be int, got 'x'"):
        parse("ablate", "--out", "o", "--seeds", "0,x")
    with pytest.raises(HelpRequested):
        parse("synth", "--help")


def test_values_are_validated_by_the_dataclass_itself() -> None:
    with pytest.raises(ConfigError, match="k_max=2 is below k_min=3"):  # SynthConfig.__post_init__
        parse("synth", "--out", "x", "--k-min", "3", "--k-max", "2")
    result = RUNNER.invoke(app, ["synth", "--out", "x", "--k-min", "3", "--k-max", "2"])
    assert result.exit_code == 2 and "k_max=2 is below k_min=3" in result.output


def test_synth_runs_with_flags_and_with_a_config_file(tmp_path: Path) -> None:
    def digest(folder: Path) -> str:
        return hashlib.sha256((folder / "train.en.jsonl").read_bytes()).hexdigest()

    flags = ["--reports", "3", "--seed", "4", "--image-size", "32", "--k-max", "2"]
    assert RUNNER.invoke(app, ["synth", "--out", str(tmp_path / "a"), *flags]).exit_code == 0
    (tmp_path / "s.yaml").write_text("reports: 3\nseed: 4\nimage_size: 32\nk_max: 2\n", encoding="utf-8")
    result = RUNNER.invoke(app, ["synth", "--out", str(tmp_path / "b"), "--config", str(tmp_path / "s.yaml")])
    assert result.exit_code == 0, result.output
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
