"""Command-line options generated from dataclasses: one syntax, help and validation for every command.

What this file owns: turning a command's options dataclass into its flags, its `--help` text and
a validated instance, so that `cli.py` only lists commands. Every command reads its arguments the
same way (litgpt / jsonargparse style):

- `--name VALUE`, `--name=VALUE` or `name=VALUE`; fields of nested dataclasses are dotted
  (`--llm.base_url URL`, `--train.stage2.lr 1e-4`). `-` and `_` are interchangeable, and a dotted
  name may also be joined with `-` where that is unique (`--llm-base-url`).
- Booleans: `--flag`, `--no-flag`, `--flag=false` (or `--flag false`).
- Lists: repeat the flag (`--image a.png --image b.png`); lists of numbers or words also take one
  comma list (`--seeds 0,1,2`).
- `--config FILE.yaml`: values for any of the command's fields (nested sections as mappings);
  flags on the command line override it. Commands that train (`build(..., training=FIELD)`) have
  a `config` field of their own, the training preset, and collect every `--model.*` /
  `--train.*` / `--data.*` flag into FIELD as a dotted override, checked against the `Config`
  tree (the preset's keys, listed in their `--help`).
- Environment variables fill options that the command names, when neither the command line nor
  `--config` set them.

Notable choices:
- Help text is each field's attribute docstring (the string literal right below the field), read
  with `ast`; one convention for every options dataclass, and tests/test_cli.py fails on a field
  without one.
- Values are converted by the field's type (a str field takes the text as typed, so
  `--api-version 2024-10-21` stays a string; other scalars are YAML scalars), and the instance is
  built by calling the dataclass, so its own `__post_init__` validates it. An unknown flag names
  the closest valid one; a missing required one names itself.
- A field marked `flat()` contributes its dataclass's fields at the top level (e.g. `eval`'s
  `EvalSettings`), `positional()` makes a field an argument, and `command(..., aliases=...)`
  keeps historical flag names (`--from`, `--all`) without renaming fields.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
import yaml

from .config import read_yaml_mapping
from .errors import ConfigError, LlavaUltraError

TRAINING_SECTIONS = ("model", "train", "data")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def flat(cls: type | None = None, **kwargs: Any) -> Any:
    """A nested dataclass field whose fields appear without a prefix (`--batch-size`, not
    `--settings.batch_size`); pass `cls` to default it to `cls()`."""
    if cls is not None:
        kwargs["default_factory"] = cls
    return field(metadata={"cli": "flat"}, **kwargs)


def positional(**kwargs: Any) -> Any:
    """A field given as a positional argument (a list field takes all remaining ones)."""
    return field(metadata={"cli": "positional"}, **kwargs)


# ------------------------------------------------------------------------------------ fields


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring, for `cls` and its dataclass bases (ast, no import)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        node = ast.parse(source).body[0]
        body = node.body if isinstance(node, ast.ClassDef) else []
        for stmt, after in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _is_seq(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple)


def _item_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not Ellipsis]
    return args[0] if args else str


@dataclass(frozen=True)
class Option:
    """One leaf field: where it sits in the options tree and how it is written."""

    path: tuple[str, ...]
    """Field names from the root dataclass down to this field."""
    name: str
    """Dotted option name ('batch_size', 'llm.base_url'); flat sections add no prefix."""
    type: Any
    """The annotated type, None unwrapped (see `optional`)."""
    optional: bool
    """None is a valid value."""
    default: Any
    """The field's default (a fresh one for default_factory) or dataclasses.MISSING."""
    help: str
    """The field's attribute docstring."""
    kind: str = ""
    """'positional' or '' (an ordinary option)."""

    @property
    def flag(self) -> str:
        """How help writes it: dashes in a plain name, the config key as is in a dotted one."""
        return "--" + (self.name if "." in self.name else self.name.replace("_", "-"))

    @property
    def is_bool(self) -> bool:
        return self.type is bool

    @property
    def is_list(self) -> bool:
        return _is_seq(self.type)

    def metavar(self) -> str:
        """TEXT, INT, FLOAT, PATH, YAML (mappings), A,B (fixed pairs) or X (repeatable)."""

        def word(tp: Any) -> str:
            if _is_seq(tp):
                return ",".join(word(a) for a in typing.get_args(tp) if a is not Ellipsis) or "VALUE"
            if tp is dict or typing.get_origin(tp) is dict:
                return "YAML"
            return {str: "TEXT", int: "INT", float: "FLOAT", Path: "PATH", bool: "BOOL"}.get(tp, "VALUE")

        if not self.is_list:
            return word(self.type)
        args = typing.get_args(self.type)
        if args and Ellipsis not in args and len(args) > 1:  # a fixed-length tuple: one comma list
            return word(self.type)
        item = _item_type(self.type)
        splits = item is not Path and not _is_seq(item)
        return f"{word(item)} (repeatable{', or a comma list' if splits else ''})"


def options_of(cls: type, path: tuple[str, ...] = (), prefix: str = "") -> list[Option]:
    """Every leaf option of dataclass `cls`, nested sections included, in field order."""
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap(hints[f.name])
        kind = f.metadata.get("cli", "")
        if dataclasses.is_dataclass(tp) and kind != "positional":
            sub = prefix if kind == "flat" else f"{prefix}{f.name}."
            out += options_of(tp, (*path, f.name), sub)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        out.append(
            Option((*path, f.name), prefix + f.name, tp, optional, default, docs.get(f.name, ""), kind)
        )
    return out


# ----------------------------------------------------------------------------------- parsing


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _joined(name: str) -> str:
    return _norm(name).replace(".", "_")


class OptionTable:
    """Name lookup for one command: exact, alias, or dotted-joined-with-dashes where unique."""

    def __init__(self, options: list[Option], aliases: Mapping[str, str]) -> None:
        self.options = options
        self.by_name = {o.name: o for o in options}
        self.aliases = {_norm(k): _norm(v) for k, v in aliases.items()}
        joined: dict[str, list[Option]] = {}
        for o in options:
            joined.setdefault(_joined(o.name), []).append(o)
        self.joined = {k: v[0] for k, v in joined.items() if len(v) == 1}

    def find(self, key: str) -> Option | None:
        key = _norm(key)
        key = self.aliases.get(key, key)
        return self.by_name.get(key) or self.joined.get(_joined(key))

    def unknown(self, key: str) -> ConfigError:
        names = [o.flag for o in self.options if o.kind != "positional"]
        hint = difflib.get_close_matches("--" + key, names, n=1, cutoff=0.6)
        extra = f"; did you mean {hint[0]}?" if hint else ""
        return ConfigError(f"unknown option --{key}{extra} (see --help for the list)")


def _bool(text: str, where: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{where} takes true or false, got {text!r}")


def _scalar(text: str, tp: Any, where: str) -> Any:
    """One command-line word as a value of type `tp` (str and Path: as typed; else YAML)."""
    if tp in (str, Any) or tp is Path:
        return text
    if tp is bool:
        return _bool(text, where)
    if _is_seq(tp):  # an item that is itself a tuple, e.g. a pixel box "x0,y0,x1,y1"
        return [_scalar(t.strip(), _item_type(tp), where) for t in text.split(",")]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: cannot read {text!r} ({exc.problem})") from None


def _value(option: Option, words: list[str]) -> Any:
    """The words given for `option` (several when repeated) as one value."""
    where = option.flag
    if option.optional and len(words) == 1 and words[0].strip().lower() in ("null", "none"):
        return None
    if option.is_list:
        item = _item_type(option.type)
        split = item not in (Path,) and not _is_seq(item)
        parts = [p.strip() for w in words for p in (w.split(",") if split else [w]) if p.strip()]
        return [_scalar(p, item, where) for p in parts]
    if len(words) > 1:
        raise ConfigError(f"{where} was given {len(words)} times; give it once")
    return _scalar(words[0], option.type, where)


def _check_training_key(key: str) -> None:
    """Raise ConfigError (closest valid key) unless `key` is a dotted field of the training Config."""
    from .config import apply_overrides

    apply_overrides({}, {key: None})


@dataclass
class Parsed:
    """What the command line said, before building the dataclass."""

    words: dict[str, list[str]] = field(default_factory=dict)
    positionals: list[str] = field(default_factory=list)
    config: Path | None = None
    training: list[str] = field(default_factory=list)
    help: bool = False


def split_args(args: Sequence[str], table: OptionTable, *, training: bool) -> Parsed:
    """Group the words of `args` by option; no type conversion yet."""
    parsed = Parsed()
    own_config = table.find("config") is not None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("--help", "-h"):
            parsed.help = True
            continue
        if arg == "--":
            parsed.positionals += args[i:]
            break
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
        elif "=" in arg and not arg.startswith("-"):
            key, eq, raw = arg.partition("=")
            if table.find(key) is None and not (training and key.split(".")[0] in TRAINING_SECTIONS):
                parsed.positionals.append(arg)  # e.g. a file name holding '='
                continue
        else:
            parsed.positionals.append(arg)
            continue
        option = table.find(key)
        negated = False
        if option is None and _norm(key).startswith("no_"):
            base = table.find(key[3:])
            if base is not None and base.is_bool:
                option, negated = base, True
        is_config = key == "config" and not own_config
        is_training = option is None and training and _norm(key).split(".")[0] in TRAINING_SECTIONS
        if option is None and not (is_config or is_training):
            raise table.unknown(key)
        if not eq and not (option is not None and option.is_bool):
            if i >= len(args) or (args[i].startswith("--") and len(args[i]) > 2):
                raise ConfigError(f"option --{key} needs a value: write --{key} VALUE or --{key}=VALUE")
            raw, i = args[i], i + 1
        if is_config:
            parsed.config = Path(raw)
        elif is_training:
            _check_training_key(_norm(key))
            parsed.training.append(f"{_norm(key)}={raw}")
        elif option.is_bool:
            if negated and eq:
                raise ConfigError(f"--{key} takes no value; write --{key[3:]}={raw} instead")
            if not eq and i < len(args) and args[i].strip().lower() in _TRUE | _FALSE:
                raw, eq, i = args[i], "=", i + 1
            value = "false" if negated else (raw if eq else "true")
            parsed.words[option.name] = [*parsed.words.get(option.name, []), value]
        else:
            parsed.words[option.name] = [*parsed.words.get(option.name, []), raw]
    return parsed


# ------------------------------------------------------------------------------------ building


def _read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(
        path, "pass a YAML file of this command's options", "must hold a mapping of option names to values"
    )


def _from_yaml(data: Mapping[str, Any], table: OptionTable, where: str) -> dict[str, Any]:
    """A YAML mapping (nested sections or dotted keys) -> {option name: value}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else str(key)
        option = table.find(name)
        if option is not None:
            out[option.name] = value
        elif isinstance(value, dict):
            out.update(_from_yaml(value, table, name))
        else:
            raise table.unknown(name)
    return out


def _convert(value: Any, tp: Any, optional: bool, where: str) -> Any:
    """A YAML or command-line value as the field's type (Paths, tuples); other types as given."""
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be null")
    tp, inner_optional = _unwrap(tp)
    if tp is Path:
        return Path(value)
    if _is_seq(tp) and isinstance(value, list | tuple):
        items = [_convert(v, _item_type(tp), inner_optional, where) for v in value]
        return tuple(items) if typing.get_origin(tp) in (tuple, Sequence, typing.Sequence) else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads '1e-4' as a string
        except ValueError:
            pass
    if tp in (int, float, bool, str) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: Mapping[tuple[str, ...], Any], path: tuple[str, ...] = ()) -> Any:
    """Call `cls` (and its nested dataclasses) with the given leaf values; defaults elsewhere."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        here = (*path, f.name)
        tp, optional = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp) and f.metadata.get("cli") != "positional":
            if here in values:
                kwargs[f.name] = values[here]
            elif any(k[: len(here)] == here for k in values) or (
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ):
                kwargs[f.name] = _build(tp, values, here)
        elif here in values:
            kwargs[f.name] = _convert(values[here], hints[f.name], optional, f.name)
    return cls(**kwargs)


def build(
    cls: type,
    args: Sequence[str],
    *,
    aliases: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    training: str | None = None,
) -> Any:
    """Parse `args` into a validated instance of `cls` (see the module docstring for the syntax).

    `aliases`: extra flag names -> option names; `env`: option name -> environment variable;
    `defaults`: option name -> default replacing the field's; `training`: the list[str] option
    that collects training-config overrides. Raises `ConfigError` for any problem, and
    `HelpRequested` for `--help`.
    """
    options = options_of(cls)
    table = OptionTable(options, aliases or {})
    collect = table.by_name[training] if training else None
    parsed = split_args(args, table, training=collect is not None)
    if parsed.help:
        raise HelpRequested
    given: dict[str, Any] = dict(defaults or {})
    for name, variable in (env or {}).items():
        if os.environ.get(variable):
            given[name] = os.environ[variable]
    if parsed.config is not None:
        given.update(_from_yaml(_read_yaml(parsed.config), table, ""))
    for name, words in parsed.words.items():
        given[name] = _value(table.by_name[name], words)
    slots = [o for o in options if o.kind == "positional"]
    words = list(parsed.positionals)
    for o in slots:
        if not words:
            break
        if o.is_list:
            given[o.name], words = _value(o, words), []
        else:
            given[o.name] = _value(o, [words.pop(0)])
    if words:
        raise ConfigError(f"unexpected argument(s): {' '.join(words)}")
    if collect is not None:
        given[collect.name] = [*given.get(collect.name, []), *parsed.training]
    missing = [o for o in options if o.default is dataclasses.MISSING and o.name not in given]
    if missing:
        what = ", ".join(o.name.upper() if o.kind == "positional" else o.flag for o in missing)
        raise ConfigError(f"missing {what}; see --help")
    values = {table.by_name[name].path: value for name, value in given.items()}
    try:
        return _build(cls, values)
    except TypeError as exc:  # a wrong type reached a dataclass that does not check its own
        raise ConfigError(str(exc)) from None


class HelpRequested(Exception):
    """`--help` was among the arguments."""


# --------------------------------------------------------------------------------------- help


def render_help(
    prog: str,
    doc: str,
    cls: type,
    *,
    aliases: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    training: str | None = None,
    width: int = 100,
) -> str:
    """`--help` text: usage, the command's docstring, then one entry per option with its help."""
    options = options_of(cls)
    slots = [o for o in options if o.kind == "positional"]
    back = {_norm(v): k for k, v in (aliases or {}).items()}
    env_of = {k: v for k, v in (env or {}).items()}
    args = " ".join(o.name.upper() + ("..." if o.is_list else "") for o in slots)
    lines = [f"Usage: {prog} {args + ' ' if args else ''}[OPTIONS]", "", inspect.cleandoc(doc), ""]

    def entry(head: str, text: str) -> None:
        lines.append(f"  {head}")
        for para in text.splitlines() or [""]:
            lines.extend(textwrap.wrap(para, width, initial_indent=" " * 6, subsequent_indent=" " * 6))

    if slots:
        lines.append("Arguments:")
        for o in slots:
            entry(o.name.upper(), o.help)
        lines.append("")
    lines.append("Options:")
    for o in options:
        if o.kind or o.name == training:
            continue
        flag = "--" + back[o.name].replace("_", "-") if o.name in back else o.flag
        head = flag if o.is_bool else f"{flag} {o.metavar()}"
        if o.is_bool and not _norm(o.name).split(".")[-1].startswith("no_"):
            head += f" / --no-{flag[2:]}"
        default = (defaults or {}).get(o.name, o.default)
        notes = []
        if default is dataclasses.MISSING:
            notes.append("required")
        elif default not in (None, (), [], "", False):
            shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
            notes.append(f"default: {shown}")
        if o.name in env_of:
            notes.append(f"env {env_of[o.name]}")
        entry(head, o.help + (f" [{'; '.join(notes)}]" if notes else ""))
    if training:
        from .config import Config

        lines += [
            "",
            "Training config (--config FILE: the preset YAML; any key below overrides it, e.g.",
            "--train.stage2.lr 1e-4, --train.stage2.lr=1e-4 or train.stage2.lr=1e-4):",
        ]
        for o in options_of(Config):
            entry(f"--{o.name} {o.metavar()}", o.help)
    else:
        lines += ["", "  --config FILE", "      YAML with values for any option above; flags override it."]
    lines += ["  --help", "      Show this message and exit."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- commands

Loader = Callable[[], tuple[type, Callable[[Any], None]]]
"""A command: imports what it needs, returns (its options dataclass, the function running it)."""


@dataclass(frozen=True)
class Command:
    """A registered command: its loader and how its flags are read (see `build`)."""

    name: str
    loader: Loader
    aliases: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    training: str | None = None
    """The option collecting training-config overrides (`--train.stage2.lr 1e-4`), if any."""

    def options(self) -> type:
        return self.loader()[0]

    def help(self) -> str:
        return render_help(
            f"llava-ultra {self.name}",
            self.loader.__doc__ or "",
            self.options(),
            aliases=self.aliases,
            env=self.env,
            defaults=self.defaults,
            training=self.training,
        )

    def run(self, args: list[str]) -> None:
        cls, run = self.loader()
        try:
            opts = build(
                cls, args, aliases=self.aliases, env=self.env, defaults=self.defaults, training=self.training
            )
        except HelpRequested:
            typer.echo(self.help(), nl=False)
            return
        run(opts)


class Commands(dict[str, Command]):
    """The commands of a typer app by name; `command(...)` registers a loader as one.

    Each is a typer command that hands its raw arguments to `build` (typer parses nothing but the
    command name). A `LlavaUltraError` is printed as a one-line message and exits with status 2;
    any other exception is a bug and keeps its traceback.
    """

    def __init__(self, app: typer.Typer) -> None:
        super().__init__()
        self.app = app

    def command(
        self,
        name: str | None = None,
        *,
        aliases: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        defaults: dict[str, Any] | None = None,
        training: str | None = None,
    ) -> Callable[[Loader], Loader]:
        """Register a loader as `llava-ultra NAME`; its docstring is the command's help."""

        def register(loader: Loader) -> Loader:
            cmd = Command(
                name or loader.__name__.removesuffix("_cmd").replace("_", "-"),
                loader,
                dict(aliases or {}),
                dict(env or {}),
                dict(defaults or {}),
                training,
            )
            self[cmd.name] = cmd

            def callback(ctx: typer.Context) -> None:
                try:
                    cmd.run(list(ctx.args))
                except LlavaUltraError as exc:
                    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
                    raise typer.Exit(2) from None

            callback.__doc__ = loader.__doc__
            settings = {"allow_extra_args": True, "ignore_unknown_options": True}
            self.app.command(cmd.name, add_help_option=False, context_settings=settings)(callback)
            return loader

        return register
