"""The training config: one TOML file mapped onto one dataclass per section.

`load_config(path, overrides)` reads the file, applies `--section.key=value` overrides,
checks every key and type, and checks the combinations (`validate.py`) before any process
group is created or any file is written. Every error is a `ConfigError` (a ValueError)
whose message names the file or the override, the section and the key.

The reference of every key, its default and meaning is docs/config.md (a test keeps the
two in step).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A config value that is unknown, of the wrong type, or impossible in combination."""


@dataclass
class JobConfig:
    name: str = "run"
    output_dir: str = "outputs"
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = "debug"
    # Any other key of [model] overrides the ModelArgs field of the same name.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Float8Config:
    enabled: bool = False
    backend: Literal["auto", "cuda", "emulated", "bf16"] = "auto"
    exact_scales: bool = False
    dispatch_payload: Literal["bf16", "float8"] = "bf16"


@dataclass
class ParallelConfig:
    ep: int = 1
    dp_replicate: int = 1


@dataclass
class TrainingConfig:
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    max_norm: float = 1.0
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8


@dataclass
class LRScheduleConfig:
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1


@dataclass
class RouterConfig:
    bias_update_rate: float = 1e-3


@dataclass
class DataConfig:
    source: Literal["synthetic", "text", "jsonl", "tokens"] = "synthetic"
    path: str = ""
    blend: list[str] = field(default_factory=list)
    blend_weights: list[float] = field(default_factory=list)
    tokenizer: str = "bytes"
    jsonl_field: str = "text"
    seed: int = 0
    synthetic_vocab: int = 256
    synthetic_branching: int = 4

    @property
    def paths(self) -> list[str]:
        """The training corpora's paths: `blend`, or `path` alone."""
        return list(self.blend) if self.blend else [self.path]


@dataclass
class ValidationConfig:
    enabled: bool = False
    interval: int = 100
    batches: int = 4
    path: str = ""


@dataclass
class CheckpointConfig:
    enabled: bool = False
    interval: int = 500
    keep_last: int = 3
    folder: str = "checkpoints"
    resume: bool = True
    initial_load: str = ""


@dataclass
class MetricsConfig:
    log_every: int = 10
    jsonl: bool = True
    tensorboard: bool = True
    peak_flops: float = 0.0


@dataclass
class ActivationCheckpointConfig:
    mode: Literal["none", "full", "selective"] = "none"


@dataclass
class CompileConfig:
    enabled: bool = False


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    float8: Float8Config = field(default_factory=Float8Config)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    activation_checkpoint: ActivationCheckpointConfig = field(
        default_factory=ActivationCheckpointConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    # Where the values came from, for error messages; not a TOML key.
    source: str = field(default="<defaults>", compare=False, repr=False)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if f.name != "source")


def section_fields(section: str) -> dict[str, Any]:
    """{key: type} of one section's dataclass (ModelConfig without `overrides`)."""
    cls = typing.get_type_hints(Config)[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "overrides"}


def model_arg_types() -> dict[str, Any]:
    """{field: type} of ep_fp8.model.ModelArgs: the keys [model] may override."""
    from ep_fp8.model import ModelArgs

    hints = typing.get_type_hints(ModelArgs)
    return {f.name: hints[f.name] for f in dataclasses.fields(ModelArgs)}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against the annotation `tp`; ints are accepted where a float is
    wanted (TOML `max_norm = 1`). Raises ConfigError naming `where` otherwise."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where} must be {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (tuple, list):
        if isinstance(value, str):   # a list the shell unquoted, or one written as a string
            raise ConfigError(f"{bad}: write a TOML list, such as [\"a\", \"b\"] or [1, 2] (on "
                              f"the command line in quotes: '--section.key=[\"a\", \"b\"]')")
        if not isinstance(value, (list, tuple)):
            raise bad
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and Ellipsis not in typing.get_args(tp) and len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        items = [coerce(v, args[min(i, len(args) - 1)], f"{where}[{i}]")
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                raise ConfigError(f"{bad} (TOML booleans are lowercase: {value.lower()})")
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"config type {tp!r} of {where} has no checker")  # a code bug, not input


def _is_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) is Literal
                         and all(isinstance(c, str) for c in typing.get_args(tp)))


def parse_override(arg: str) -> tuple[str, str, str]:
    """'--section.key=value' -> (section, key, raw value text)."""
    if not arg.startswith("--") or "=" not in arg or "." not in arg.split("=", 1)[0]:
        raise ConfigError(f"command line: {arg!r} is not of the form --section.key=value")
    name, raw = arg[2:].split("=", 1)
    section, key = name.split(".", 1)
    return section, key, raw


def _override_value(raw: str, tp: Any) -> Any:
    """The value text of an override read as a TOML value (`true`, `3`, `[0.9, 0.95]`,
    `"x"`); a bare word is a string, so `--job.name=foo` needs no quotes."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw
    if _is_text(tp) and not isinstance(value, str):
        return raw
    return value


def _key_type(section: str, key: str, where: str) -> Any:
    """The annotation of [section] key (for [model], of the ModelArgs field); ConfigError
    naming `where` for an unknown section or key."""
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section [{section}] "
                          f"(known: {', '.join(SECTIONS)})")
    fields = model_arg_types() if section == "model" and key != "name" else section_fields(section)
    if key not in fields:
        known = ("name, " if section == "model" else "") + ", ".join(fields)
        raise ConfigError(f"{where}: unknown key '{key}' in [{section}] (known: {known})")
    return fields[key]


def _set(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    """Set one key after checking the section, the key and the value's type."""
    value = coerce(value, _key_type(section, key, where), f"{where}: [{section}] {key}")
    if section == "model" and key != "name":
        cfg.model.overrides[key] = value
    else:
        setattr(getattr(cfg, section), key, value)


def load_config(path: str | None, overrides: typing.Sequence[str] = (),
                world_size: int | None = None, run_folder: bool = True) -> Config:
    """Read `path` (None: all defaults), apply `--section.key=value` overrides, check keys,
    types and combinations for `world_size` ranks (None: skip the world-size checks).
    `run_folder=False` skips the checks of the run's and the checkpoints' folders, for a
    tool that builds the run but writes nothing there (scripts/profile_train_step.py).

    Touches no process group and writes no file. Raises ConfigError (a ValueError) naming
    the file or override and the key; FileNotFoundError for a missing config file.
    """
    cfg = read_config(path, overrides)
    from ep_fp8.train.validate import validate

    validate(cfg, world_size, run_folder)
    return cfg


def read_config(path: str | None, overrides: typing.Sequence[str] = ()) -> Config:
    """load_config without its checks of values, combinations, files and folders: only
    the TOML, the keys and their types (for a tool reading a finished run's config.toml,
    whose data files may be gone). Raises ConfigError naming the file or override and the
    key, FileNotFoundError for a missing file, as load_config does."""
    cfg = Config(source=path or "<defaults>")
    if path is not None:
        try:
            with open(path, "rb") as f:
                # A byte-order mark (some editors write one) is not TOML: skip it.
                doc = tomllib.loads(f.read().decode("utf-8").removeprefix("\ufeff"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except FileNotFoundError:
            raise
        except OSError as e:   # a folder, no permission, a name too long, a file on the path
            raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key '{section}' must be a [section]")
            for key, value in table.items():
                _set(cfg, section, key, value, path)
    for arg in overrides:
        section, key, raw = parse_override(arg)
        where = f"command line {arg}"
        _set(cfg, section, key, _override_value(raw, _key_type(section, key, where)), where)
    if overrides:
        cfg.source = f"{cfg.source} + command line"
    return cfg


def to_dict(cfg: Config, resolve_model: bool = False) -> dict[str, dict[str, Any]]:
    """{section: {key: value}}; [model] flattened (name first, then its overrides). With
    `resolve_model`, [model] lists every ModelArgs field of the resolved model, so the
    result reproduces the run even if the preset changes later."""
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(cfg, section))
        if section == "model":
            fields = (dataclasses.asdict(resolve_model_args(cfg)) if resolve_model
                      else values["overrides"])
            values = {"name": values["name"], **fields}
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return out


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"'} | {
    chr(c): f"\\u{c:04x}" for c in [*range(0x20), 0x7F] if c != 0x09}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):   # a TOML basic string: backslash, quote and controls escaped
        return '"' + "".join(_TOML_ESCAPES.get(c, c) for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: Config, resolve_model: bool = False) -> str:
    """The config as TOML text that `load_config` reads back (to an equal Config without
    `resolve_model`; to one that builds the same model with it)."""
    lines = []
    for section, values in to_dict(cfg, resolve_model).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def resolve_model_args(cfg: Config):
    """ep_fp8.model.ModelArgs of the preset `model.name` with the [model] overrides applied.

    Raises ConfigError for an unknown preset name."""
    from ep_fp8.model import PRESETS

    if cfg.model.name not in PRESETS:
        raise ConfigError(f"{cfg.source}: [model] name must be one of "
                          f"{', '.join(sorted(PRESETS))}, got {cfg.model.name!r}")
    return dataclasses.replace(PRESETS[cfg.model.name], **cfg.model.overrides)


def run_dir(cfg: Config) -> str:
    """The run's folder: job.output_dir / job.name (config, metrics, checkpoints); a
    leading ~ is the home folder, as in [data] path."""
    return os.path.join(os.path.expanduser(cfg.job.output_dir), cfg.job.name)


def checkpoint_dir(cfg: Config, folder: str | None = None) -> str:
    """checkpoint.folder (or `folder` in its place), relative to the run's folder unless it
    is absolute (a leading ~ is the home folder)."""
    return os.path.join(run_dir(cfg), os.path.expanduser(
        cfg.checkpoint.folder if folder is None else folder))
