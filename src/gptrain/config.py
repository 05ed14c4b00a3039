"""RunConfig: the composition of every component's config; TOML recipes, presets, env and overrides.

Precedence, lowest first: defaults < preset < TOML recipe < .env file < environment < CLI flags.
Dotted keys (`model.n_embd`) address fields; unknown keys and ill-typed values are UserErrors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from gptrain.data.prepare import DataConfig, source_slug
from gptrain.distributed.parallel import ParallelConfig
from gptrain.errors import UserError
from gptrain.eval.val_loss import EvalConfig
from gptrain.faults import FAULT_ENV, MARKER_ENV, parse_fault
from gptrain.metrics.console import LogConfig
from gptrain.model.gpt import ModelConfig
from gptrain.presets import get_preset
from gptrain.tokenizer import TokenizerConfig
from gptrain.train.checkpoint import CheckpointConfig
from gptrain.train.optim import OptimConfig
from gptrain.train.samples import SamplesConfig
from gptrain.train.schedule import ScheduleConfig
from gptrain.train.step import TrainConfig

ENV_PREFIX = "GPTRAIN_"
# Variables read by other parts (not config fields): the asset cache, its URL, setup, the CPU linear switch,
# the switch for gptrain's own CPU kernels, where speed measurements are cached, the switch that keeps
# downloads from the network, where HellaSwag is downloaded from, and the test-only fault points (faults.py).
NON_CONFIG_ENV = {"GPTRAIN_CACHE", "GPTRAIN_GPT2_URL", "GPTRAIN_TORCH_SPEC", "GPTRAIN_ONEDNN_LINEAR",
                  "GPTRAIN_CPU_KERNELS", "GPTRAIN_SPEED_CACHE", "GPTRAIN_OFFLINE", "GPTRAIN_HELLASWAG_URL",
                  FAULT_ENV, MARKER_ENV}

# A run given no length (no steps, epochs or budget in any layer) trains this long: the default job
# ends in about the same time on any machine (train/budget.py plans its steps).
DEFAULT_BUDGET = "10m"

# Flags people know from nanoGPT, llm.c and friends, as aliases of config fields.
ALIASES = {
    "embd": "model.n_embd",
    "layers": "model.n_layer",
    "heads": "model.n_head",
    "context": "model.block_size",
    "vocab": "tokenizer.vocab_size",
    "lr": "schedule.peak_lr",
    "batch-size": "train.batch_size",
    "epochs": "train.num_epochs",
    "steps": "train.num_steps",
    "budget": "train.budget",
    "model-size": "preset",
    "preset": "preset",
    "device": "device",
    "seed": "seed",
    "name": "name",
    "data": "data.source",
    "val-data": "data.val_source",
    "text-field": "data.text_field",
    "workers": "data.num_workers",
    "tokenizer": "tokenizer.kind",
    "parallel": "parallel.strategy",
    # Other trainers' names:
    "learning-rate": "schedule.peak_lr",
    "train-path": "data.source",
    "eval-path": "data.val_source",
    "checkpoint-dir": "run_dir",
}
# Keys other trainers read from a .env file, honoured there only (never from the process environment,
# so a stray BATCH_SIZE in a shell does not change a run); a GPTRAIN_ key in the same file wins.
DOTENV_BARE_KEYS = {
    "TRAIN_DATA_PATH": "data.source",
    "EVAL_DATA_PATH": "data.val_source",
    "CHECKPOINT_DIR": "run_dir",
    "EPOCHS": "train.num_epochs",
    "BATCH_SIZE": "train.batch_size",
    "LEARNING_RATE": "schedule.peak_lr",
}


@dataclass(kw_only=True)
class RunConfig:
    name: str = "shakespeare"  # with data.source given and no name, the source's short name
    run_dir: str = ""  # empty: runs/<name>-<YYYYmmdd-HHMMSS>
    seed: int = 1337
    device: str = "auto"  # auto: CUDA, then Apple MPS, then CPU
    preset: str = ""  # a named size from `gptrain presets`; applied before any other value
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise UserError(f"seed must be >= 0 (got {self.seed})")


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}


def _field_type(cls: type, name: str) -> type:
    return typing.get_type_hints(cls)[name]


def parse_value(text: object, kind: type, key: str) -> object:
    """Turn a TOML value or a command-line/env string into the field's type, or fail clearly
    (NaN and infinity are refused everywhere: no setting means them)."""
    value = _parse_value(text, kind, key)
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number (got {text!r})")
    return value


def _parse_value(text: object, kind: type, key: str) -> object:
    base = typing.get_args(kind)[0] if typing.get_origin(kind) in (typing.Union, type(int | None)) else kind
    if isinstance(text, str) and base is not str:
        lowered = text.strip().lower()
        if base is bool:
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise UserError(f"{key} expects true or false (got {text!r})")
        try:
            return int(lowered.replace("_", "")) if base is int else float(lowered) if base is float else text
        except ValueError:
            raise UserError(f"{key} expects {base.__name__} (got {text!r})") from None
    if base is float and isinstance(text, int) and not isinstance(text, bool):
        return float(text)
    if base in (int, float, bool, str) and not isinstance(text, base) or (base is int and isinstance(text, bool)):
        raise UserError(f"{key} expects {base.__name__} (got {text!r})")
    return text


def known_keys() -> list[str]:
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in _sections()]
    for section, cls in _sections().items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def apply_overrides(cfg: RunConfig, values: dict[str, object]) -> RunConfig:
    """A new RunConfig with dotted keys set (values type-checked; every section re-validated)."""
    sections = _sections()
    changes: dict[str, dict[str, object]] = {}
    top: dict[str, object] = {}
    for key, raw in values.items():
        key = ALIASES.get(key, key)
        section, _, name = key.partition(".")
        if name:
            if section not in sections or name not in {f.name for f in dataclasses.fields(sections[section])}:
                raise UserError(f"unknown config key {key!r} (see `gptrain train --help` for the keys)")
            changes.setdefault(section, {})[name] = parse_value(raw, _field_type(sections[section], name), key)
        else:
            if key not in {f.name for f in dataclasses.fields(RunConfig)} or key in sections:
                raise UserError(f"unknown config key {key!r} (see `gptrain train --help` for the keys)")
            top[key] = parse_value(raw, _field_type(RunConfig, key), key)
    parts = {s: dataclasses.replace(getattr(cfg, s), **c) for s, c in changes.items()}
    return dataclasses.replace(cfg, **top, **parts)


def flatten(table: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_toml(path: str | Path) -> dict[str, object]:
    path = Path(path)
    try:
        return flatten(tomllib.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None


def env_values(environ: typing.Mapping[str, str]) -> dict[str, str]:
    """GPTRAIN_MODEL__N_EMBD=128 sets model.n_embd; GPTRAIN_LR=1e-3 sets an alias (here: lr)."""
    by_env = {ENV_PREFIX + k.upper().replace(".", "__"): k for k in known_keys()}
    by_env |= {ENV_PREFIX + a.upper().replace("-", "_"): a for a in ALIASES}
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in by_env and k not in NON_CONFIG_ENV)
    if unknown:
        raise UserError(f"unknown setting {unknown[0]} in the environment or .env (config keys look like "
                        "GPTRAIN_MODEL__N_EMBD; aliases like GPTRAIN_LR)")
    parse_fault(environ.get(FAULT_ENV, ""))  # a malformed test fault is refused here, not ignored
    return {by_env[k]: v for k, v in environ.items() if k in by_env}


def read_dotenv(path: Path = Path(".env")) -> dict[str, str]:
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def resolve_config(
    recipe: str | Path | None = None,
    cli: dict[str, object] | None = None,
    environ: typing.Mapping[str, str] | None = None,
    dotenv_path: Path = Path(".env"),
) -> RunConfig:
    """Compose a RunConfig from defaults, preset, recipe, .env, environment and CLI values."""
    dotenv = read_dotenv(dotenv_path)
    layers = [
        read_toml(recipe) if recipe else {},
        {DOTENV_BARE_KEYS[k]: v for k, v in dotenv.items() if k in DOTENV_BARE_KEYS},
        env_values(dotenv),
        env_values(os.environ if environ is None else environ),
        dict(cli or {}),
    ]
    merged: dict[str, object] = {}
    for layer in layers:
        merged |= {ALIASES.get(k, k): v for k, v in layer.items()}
    cli_keys = {ALIASES.get(k, k) for k in (cli or {})}
    if "train.budget" in cli_keys and cli_keys & {"train.num_steps", "train.num_epochs"}:
        raise UserError("--budget sets the run's length itself (from its measured speed): drop --steps / --epochs")
    if "train.num_steps" in cli_keys and "train.num_epochs" not in cli_keys:
        merged.pop("train.num_epochs", None)  # --steps on the command line beats EPOCHS from a file
    if cli_keys & {"train.num_steps", "train.num_epochs"} and "train.budget" not in cli_keys:
        merged.pop("train.budget", None)  # and a budget from a file
    if not merged.keys() & {"train.num_steps", "train.num_epochs", "train.budget"}:
        merged["train.budget"] = DEFAULT_BUDGET  # no length given anywhere: the default job's time
    if "name" not in merged and merged.get("data.source"):  # runs/<corpus>-<time>, not runs/shakespeare-<time>
        merged["name"] = source_slug(str(merged["data.source"]))
    cfg = RunConfig()
    preset = merged.pop("preset", "")
    if preset:
        cfg = apply_overrides(cfg, {**get_preset(str(preset)).values(), "preset": str(preset)})
    return apply_overrides(cfg, merged)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes are valid TOML; DEL is the one control character JSON leaves raw.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: RunConfig) -> str:
    """Every field written out, defaults included, so a run can be reproduced from this text alone."""
    top, sections = [], []
    for key, value in to_dict(cfg).items():
        if isinstance(value, dict):
            body = "\n".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None)
            sections.append(f"[{key}]\n{body}\n")
        elif value is not None:
            top.append(f"{key} = {_toml_value(value)}")
    return "\n".join(top) + "\n\n" + "\n".join(sections)


def from_toml_text(text: str) -> RunConfig:
    """Rebuild a RunConfig from to_toml() output (as stored in run directories and checkpoints)."""
    try:
        return apply_overrides(RunConfig(), flatten(tomllib.loads(text)))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"a stored config.toml is not valid TOML ({e})") from None
