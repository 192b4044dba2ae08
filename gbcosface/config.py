"""Typed configuration: one dataclass per section, TOML presets, dotted command-line overrides.

A preset is a small TOML file whose tables are the sections below; anything it leaves out keeps
the default. ``load_config(path, ["optim.lr=0.05"])`` reads a preset, applies overrides (values in
TOML syntax, parsed to the field's type), rejects unknown sections and keys, and checks each
field on its own (``__post_init__``). ``validate(cfg, world_size)`` then checks the relations
between fields and the files they name, and reports every problem in one :class:`ConfigError`,
so a user fixes a preset in one pass instead of one traceback at a time.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration: the key, what is wrong, and where it came from."""

    key: str
    message: str
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        what = f"{self.key}: " if self.key else ""
        return f"{where}{what}{self.message}"


class ConfigError(ValueError):
    """Every problem found in a configuration, raised together."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the configuration:\n{lines}")


def _f(default: Any, doc: str) -> Any:
    """A field with its one-line documentation; lists get a fresh copy per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


class _Section:
    """Shared behaviour: ``__post_init__`` runs the section's single-field checks."""

    _name = ""

    def _problems(self) -> list[tuple[str, str]]:
        return []

    def __post_init__(self) -> None:
        found = [Problem(f"{self._name}.{key}", msg) for key, msg in self._problems()]
        if found:
            raise ConfigError(found)


def _choice(value: Any, choices: tuple[str, ...]) -> str | None:
    if value in choices:
        return None
    return f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"


def _checks(*pairs: tuple[str, bool, str]) -> list[tuple[str, str]]:
    """Keep the messages whose condition failed: each pair is (key, ok, message)."""
    return [(key, msg) for key, ok, msg in pairs if not ok]


DATA_BACKENDS = ("dali", "torch", "synthetic")
LOSSES = ("gbcosface", "cosface", "arcface")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("poly", "step")
AMP_MODES = ("none", "bf16", "fp16")
ENGINES = ("ddp", "deepspeed")


@dataclass
class DataConfig(_Section):
    _name = "data"
    backend: str = _f("torch", "loader: 'dali', 'torch' (DataLoader) or 'synthetic' (random tensors, no files)")
    rec: str = _f("", "path of the training .rec file")
    idx: str = _f("", "path of the training .idx file that indexes the .rec")
    num_classes: int = _f(0, "number of identities, labels in [0, num_classes); 0 = unset, which validate() refuses")
    num_images: int = _f(0, "number of training images, for epoch length and the LR schedule; 0 = count the index")
    image_size: int = _f(112, "side of the square input crop in pixels")
    batch_size: int = _f(128, "images per rank per micro-step (global batch = batch_size x world size)")
    num_workers: int = _f(2, "loader worker processes per rank")
    seed: int = _f(0, "seed of the shuffling order, shared by all ranks so shards stay disjoint")
    skip_corrupt: bool = _f(False, "skip and count undecodable records instead of stopping with their key")

    def _problems(self) -> list[tuple[str, str]]:
        choice = _choice(self.backend, DATA_BACKENDS)
        return _checks(
            ("backend", choice is None, choice or ""),
            ("num_classes", self.num_classes >= 0, f"must be > 0, got {self.num_classes}"),
            ("num_images", self.num_images >= 0, f"must be >= 0 (0 = count the index), got {self.num_images}"),
            ("image_size", self.image_size > 0, f"must be > 0, got {self.image_size}"),
            ("batch_size", self.batch_size > 0, f"must be > 0, got {self.batch_size}"),
            ("num_workers", self.num_workers >= 0, f"must be >= 0, got {self.num_workers}"),
        )


@dataclass
class BackboneConfig(_Section):
    _name = "backbone"
    name: str = _f("iresnet50", "backbone architecture, e.g. 'iresnet100', 'iresnet50', 'mobilefacenet', 'tiny'")
    embedding_size: int = _f(512, "dimension of the face embedding")
    dropout: float = _f(0.0, "dropout before the embedding layer")

    def _problems(self) -> list[tuple[str, str]]:
        return _checks(
            ("name", bool(self.name), "must name a backbone"),
            ("embedding_size", self.embedding_size > 0, f"must be > 0, got {self.embedding_size}"),
            ("dropout", 0.0 <= self.dropout < 1.0, f"must be in [0, 1), got {self.dropout}"),
        )


@dataclass
class HeadConfig(_Section):
    _name = "head"
    sample_rate: float = _f(1.0, "Partial FC: fraction of each rank's negative classes sampled per step (1 = all)")
    seed: int = _f(0, "seed of the head weight, drawn in fixed class blocks so it does not depend on the world size")

    def _problems(self) -> list[tuple[str, str]]:
        return _checks(
            ("sample_rate", 0.0 < self.sample_rate <= 1.0, f"must be in (0, 1], got {self.sample_rate}"),
        )


@dataclass
class LossConfig(_Section):
    _name = "loss"
    name: str = _f("gbcosface", "margin loss: 'gbcosface', 'cosface' or 'arcface'")
    s: float = _f(32.0, "logit scale")
    m: float = _f(0.16, "margin (cosine margin for gbcosface/cosface, angular for arcface)")
    alpha: float = _f(0.15, "gbcosface: weight of the global boundary in the per-sample boundary")
    update_rate: float = _f(0.01, "gbcosface: moving-average rate r of the global boundary")
    boundary_min: float = _f(0.5, "gbcosface: lower clamp of the global boundary")
    boundary_max: float = _f(0.7, "gbcosface: upper clamp of the global boundary")

    def _problems(self) -> list[tuple[str, str]]:
        choice = _choice(self.name, LOSSES)
        return _checks(
            ("name", choice is None, choice or ""),
            ("s", self.s > 0, f"must be > 0, got {self.s}"),
            ("m", 0.0 <= self.m < 1.0, f"must be in [0, 1), got {self.m}"),
            ("alpha", 0.0 <= self.alpha <= 1.0, f"must be in [0, 1], got {self.alpha}"),
            ("update_rate", 0.0 < self.update_rate <= 1.0, f"must be in (0, 1], got {self.update_rate}"),
            ("boundary_min", -1.0 <= self.boundary_min <= 1.0, f"must be a cosine in [-1, 1], got {self.boundary_min}"),
            ("boundary_max", -1.0 <= self.boundary_max <= 1.0, f"must be a cosine in [-1, 1], got {self.boundary_max}"),
        )


@dataclass
class OptimConfig(_Section):
    _name = "optim"
    name: str = _f("sgd", "optimizer for backbone and head: 'sgd' or 'adamw'")
    lr: float = _f(0.1, "peak learning rate (after warmup)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "weight decay")
    head_lr: float | None = _f(None, "learning rate of the head shard; unset = same as lr")
    lr_schedule: str = _f("poly", "'poly' (decays to 0 at the end) or 'step' (x gamma at each milestone)")
    warmup_epochs: float = _f(0.0, "linear warmup from 0 to lr over this many epochs")
    milestones: list[int] = _f([], "step schedule: epochs at which the LR is multiplied by gamma")
    gamma: float = _f(0.1, "step schedule: LR factor at each milestone")
    power: float = _f(2.0, "poly schedule: exponent of (1 - progress)")
    grad_clip: float = _f(5.0, "clip the global gradient norm (backbone and all head shards) to this; 0 = off")
    grad_accum: int = _f(1, "micro-steps accumulated per optimizer step")

    def _problems(self) -> list[tuple[str, str]]:
        name, schedule = _choice(self.name, OPTIMIZERS), _choice(self.lr_schedule, LR_SCHEDULES)
        increasing = all(a < b for a, b in zip(self.milestones, self.milestones[1:]))
        return _checks(
            ("name", name is None, name or ""),
            ("lr", self.lr > 0, f"must be > 0, got {self.lr}"),
            ("momentum", 0.0 <= self.momentum < 1.0, f"must be in [0, 1), got {self.momentum}"),
            ("weight_decay", self.weight_decay >= 0, f"must be >= 0, got {self.weight_decay}"),
            ("head_lr", self.head_lr is None or self.head_lr > 0, f"must be > 0 when set, got {self.head_lr}"),
            ("lr_schedule", schedule is None, schedule or ""),
            ("warmup_epochs", self.warmup_epochs >= 0, f"must be >= 0, got {self.warmup_epochs}"),
            ("milestones", increasing and all(e > 0 for e in self.milestones),
             f"must be positive and strictly increasing, got {self.milestones}"),
            ("gamma", 0.0 < self.gamma <= 1.0, f"must be in (0, 1], got {self.gamma}"),
            ("power", self.power > 0, f"must be > 0, got {self.power}"),
            ("grad_clip", self.grad_clip >= 0, f"must be >= 0 (0 = off), got {self.grad_clip}"),
            ("grad_accum", self.grad_accum >= 1, f"must be >= 1, got {self.grad_accum}"),
        )


@dataclass
class TrainConfig(_Section):
    _name = "train"
    epochs: int = _f(20, "passes over the training set")
    amp: str = _f("none", "mixed precision: 'none', 'bf16' (autocast) or 'fp16' (autocast + grad scaler, CUDA)")
    engine: str = _f("ddp", "backbone wrapper: 'ddp' or 'deepspeed' (the head stays outside both)")
    output: str = _f("output", "run folder: checkpoints in <output>/ckpt, TensorBoard in <output>/tensorboard")
    resume: str = _f("auto", "'auto' = newest complete checkpoint under <output>/ckpt, '' = start fresh, or a path")
    max_nonfinite: int = _f(5, "stop (with a checkpoint) after this many non-finite losses in a row")
    log_every: int = _f(50, "steps between progress lines and TensorBoard scalars")
    seed: int = _f(0, "seed of the backbone initialisation and dropout")
    deterministic: bool = _f(False, "use deterministic kernels so reruns and resumes match bit for bit")
    timeout_s: float = _f(1800.0, "seconds a collective may wait before the job fails instead of hanging")
    preempt_grace_s: float = _f(25.0, "after SIGTERM, seconds to reach the next step, save and exit; past it the "
                                      "process exits with code 5 and no new checkpoint (keep below the scheduler's "
                                      "kill delay: SLURM KillWait, torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT)")

    def _problems(self) -> list[tuple[str, str]]:
        amp, engine = _choice(self.amp, AMP_MODES), _choice(self.engine, ENGINES)
        return _checks(
            ("epochs", self.epochs > 0, f"must be > 0, got {self.epochs}"),
            ("amp", amp is None, amp or ""),
            ("engine", engine is None, engine or ""),
            ("output", bool(self.output), "must name a folder"),
            ("max_nonfinite", self.max_nonfinite >= 1, f"must be >= 1, got {self.max_nonfinite}"),
            ("log_every", self.log_every >= 1, f"must be >= 1, got {self.log_every}"),
            ("timeout_s", self.timeout_s > 0, f"must be > 0, got {self.timeout_s}"),
            ("preempt_grace_s", self.preempt_grace_s > 0, f"must be > 0, got {self.preempt_grace_s}"),
        )


@dataclass
class EvalConfig(_Section):
    _name = "eval"
    bins: list[str] = _f([], "verification pair sets (.bin, InsightFace format) evaluated during training")
    every: int = _f(0, "steps between verification runs; 0 = only at the end of training")
    batch_size: int = _f(256, "images per forward pass during verification")

    def _problems(self) -> list[tuple[str, str]]:
        return _checks(
            ("every", self.every >= 0, f"must be >= 0, got {self.every}"),
            ("batch_size", self.batch_size > 0, f"must be > 0, got {self.batch_size}"),
        )


@dataclass
class CheckpointConfig(_Section):
    _name = "checkpoint"
    every: int = _f(1000, "steps between checkpoints; 0 = only at the end and on preemption")
    keep: int = _f(3, "number of newest complete checkpoints kept on disk")
    min_free_gb: float = _f(1.0, "refuse to start when the checkpoint folder's filesystem has less free GB; 0 = off")

    def _problems(self) -> list[tuple[str, str]]:
        return _checks(
            ("every", self.every >= 0, f"must be >= 0, got {self.every}"),
            ("keep", self.keep >= 1, f"must be >= 1, got {self.keep}"),
            ("min_free_gb", self.min_free_gb >= 0, f"must be >= 0 (0 = off), got {self.min_free_gb}"),
        )


@dataclass
class LogConfig(_Section):
    _name = "log"
    tensorboard: bool = _f(True, "write TensorBoard scalars (rank 0 only)")
    dir: str = _f("", "TensorBoard folder; '' = <train.output>/tensorboard")


@dataclass
class DeepSpeedConfig(_Section):
    _name = "deepspeed"
    config: str = _f("", "a DeepSpeed JSON config; when set it is used as is, and must agree with train.amp")
    zero_stage: int = _f(1, "ZeRO stage (0, 1 or 2) when no JSON is given; precision follows train.amp")

    def _problems(self) -> list[tuple[str, str]]:
        return _checks(
            ("zero_stage", self.zero_stage in (0, 1, 2), f"must be 0, 1 or 2, got {self.zero_stage}"),
        )


@dataclass
class Config:
    """The whole run: one attribute per section."""

    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    @property
    def checkpoint_dir(self) -> Path:
        """Where step folders go: ``<train.output>/ckpt``."""
        return Path(self.train.output) / "ckpt"

    @property
    def tensorboard_dir(self) -> Path:
        """``log.dir``, or ``<train.output>/tensorboard`` when unset."""
        return Path(self.log.dir) if self.log.dir else Path(self.train.output) / "tensorboard"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (JSON-serialisable), the form stored in checkpoints."""
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """A short stable digest of every value, recorded in checkpoint manifests."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise TypeError with a readable expectation."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _coerce(value, inner)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise TypeError(f"expected a list of {_type_name(item)} (a TOML array such as [5, 10] or "
                            f"[\"a\"]), got {value!r}")
        return [_coerce(v, item) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise TypeError(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(sorted(options))})"


def _parse_override_value(raw: str, tp: Any) -> Any:
    """A TOML value (``0.05``, ``true``, ``[5, 10]``, ``"x"``); a bare word for a string field."""
    text = raw.strip()
    optional = typing.get_origin(tp) in (types.UnionType, typing.Union)
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    if tp is str and not isinstance(value, str):
        value = text
    return value


def _parse_overrides(overrides: Sequence[str], problems: list[Problem]) -> list[tuple[str, str, str, str]]:
    """Split ``section.key=value`` items, reporting malformed ones."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            problems.append(Problem("", f"expected section.key=value, got {item!r}", "override"))
            continue
        parsed.append((section, name, raw, item))
    return parsed


def config_from_dict(data: dict[str, Any], source: str = "<dict>", overrides: Sequence[str] = ()) -> Config:
    """Build a Config from nested ``{section: {key: value}}`` plus overrides; report all problems."""
    problems: list[Problem] = []
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    origin: dict[str, str] = {}
    hints = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}

    def put(section: str, key: str, value: Any, where: str, label: str) -> None:
        if section not in SECTIONS:
            problems.append(Problem("", f"unknown section [{section}]{_suggest(section, list(SECTIONS))}", where))
            return
        fields = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if key not in fields:
            keys = [f"{section}.{f}" for f in fields]
            problems.append(Problem("", f"unknown key {label}{_suggest(f'{section}.{key}', keys)}", where))
            return
        try:
            values[section][key] = _coerce(value, hints[section][key])
        except TypeError as exc:
            problems.append(Problem(f"{section}.{key}", str(exc), where))
            return
        origin[f"{section}.{key}"] = where

    for section, table in data.items():
        if not isinstance(table, dict):
            problems.append(Problem("", f"top-level key {section!r} must be a [section] table", source))
            continue
        for key, value in table.items():
            put(section, key, value, source, f"{section}.{key}")
    for section, key, raw, item in _parse_overrides(overrides, problems):
        tp = hints.get(section, {}).get(key, str)
        put(section, key, _parse_override_value(raw, tp), f"override {item!r}", f"{section}.{key}")

    sections = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = cls(**values[name])
        except ConfigError as exc:
            problems.extend(dataclasses.replace(p, source=origin.get(p.key, source)) for p in exc.problems)
    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML preset (or a saved ``config.json``) and apply dotted overrides."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read the config file: {exc.strerror}", str(path))]) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError([Problem("", f"not valid {kind}: {exc}", str(path))]) from None
    return config_from_dict(data, str(path), overrides)


def _writable(path: Path) -> bool:
    """True when ``path`` exists and is writable, or could be created under a writable ancestor."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


def _backbone_names() -> list[str]:
    # Imported here: the backbones pull in torch, which reading a preset does not need.
    from gbcosface.backbones import backbone_names

    return backbone_names()


def validate(cfg: Config, world_size: int, check_paths: bool = True) -> None:
    """Check relations between fields and (with ``check_paths``) the files they name.

    Raises one :class:`ConfigError` listing every problem. ``check_paths=False`` skips the file
    checks, for presets examined away from the data (tests, dry runs).
    """
    d, o, t, ev, loss = cfg.data, cfg.optim, cfg.train, cfg.eval, cfg.loss
    problems: list[Problem] = []

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(Problem(key, message))

    need(world_size >= 1, "", f"world size must be >= 1, got {world_size}")
    need(d.num_classes > 0, "data.num_classes", "must be set to the number of identities in the training set")
    need(d.num_classes == 0 or d.num_classes >= world_size, "data.num_classes",
         f"{d.num_classes} classes cannot be sharded over {world_size} ranks: every rank needs at least one class")
    need(d.num_images == 0 or d.num_images >= d.batch_size * world_size, "data.num_images",
         f"{d.num_images} images give no full batch of {d.batch_size} on each of {world_size} ranks")
    if d.backend != "synthetic":
        for key in ("rec", "idx"):
            need(bool(getattr(d, key)), f"data.{key}", f"must be set when data.backend is {d.backend!r}")
    known = _backbone_names()
    backbone = cfg.backbone.name
    need(backbone in known, "backbone.name", f"unknown {backbone!r}{_suggest(backbone, known)}")
    need(loss.boundary_min <= loss.boundary_max, "loss.boundary_min",
         f"{loss.boundary_min} is above loss.boundary_max {loss.boundary_max}")
    if o.lr_schedule == "step":
        outside = [e for e in o.milestones if e >= t.epochs]
        need(not outside, "optim.milestones", f"{outside} not below train.epochs ({t.epochs})")
    need(o.warmup_epochs < t.epochs, "optim.warmup_epochs",
         f"{o.warmup_epochs} leaves no training after warmup (train.epochs is {t.epochs})")
    need(ev.every == 0 or bool(ev.bins), "eval.every", f"is {ev.every} but eval.bins lists no verification sets")
    need(len(set(ev.bins)) == len(ev.bins), "eval.bins", "lists the same file twice")

    if check_paths:
        files = [(f"data.{key}", getattr(d, key)) for key in ("rec", "idx") if d.backend != "synthetic"]
        files += [("eval.bins", b) for b in ev.bins]
        if t.engine == "deepspeed" and cfg.deepspeed.config:
            files.append(("deepspeed.config", cfg.deepspeed.config))
        if t.resume not in ("", "auto"):
            files.append(("train.resume", t.resume))
        for key, name in files:
            need(not name or Path(name).exists(), key, f"{name} does not exist")
        need(_writable(Path(t.output)), "train.output", f"{t.output} is not a writable folder")
        if t.engine == "deepspeed" and cfg.deepspeed.config and Path(cfg.deepspeed.config).is_file():
            problems.extend(_deepspeed_precision_problems(Path(cfg.deepspeed.config), t.amp))

    if problems:
        raise ConfigError(problems)


def _deepspeed_precision_problems(path: Path, amp: str) -> list[Problem]:
    """A DeepSpeed JSON whose bf16/fp16 sections disagree with train.amp trains in a surprise precision."""
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [Problem("deepspeed.config", f"{path} is not readable JSON: {exc}")]
    enabled = {mode for mode in ("bf16", "fp16") if ds.get(mode, {}).get("enabled") is True}
    expected = set() if amp == "none" else {amp}
    if enabled == expected:
        return []
    return [Problem("deepspeed.config", f"{path} enables {sorted(enabled) or 'no mixed precision'} "
                    f"but train.amp is {amp!r}; make them agree")]
