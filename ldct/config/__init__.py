"""Typed, frozen configuration loaded from TOML profiles with strict ``section.key=value`` overrides.

Ray and MLflow only see flat dicts (``{"loss.lambda_l1": 1.0, ...}``); :func:`to_flat` and
:func:`from_flat` convert both ways without loss.

Every field is checked against its annotation however a section is built (profile, override, flat
dict, ``dataclasses.replace``), so a bad value fails at load naming the key, not later inside a
Ray worker; a field with a closed set of values is a ``Literal``. :func:`replace` is the one way
to derive a changed config.
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ldct.config.checks import check_study, check_train
from ldct.config.coerce import ConfigError
from ldct.config.coerce import coerce as _coerce

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Profiles: studies/*.toml of a source checkout (editable installs read them in place), else the
# copy a wheel ships as package data in ldct/profiles/ (pyproject.toml maps studies/ there).
CHECKOUT_PROFILE_DIR = PROJECT_ROOT / "studies"
PACKAGED_PROFILE_DIR = Path(__file__).resolve().parents[1] / "profiles"
PROFILE_DIR = CHECKOUT_PROFILE_DIR if CHECKOUT_PROFILE_DIR.is_dir() else PACKAGED_PROFILE_DIR


# Closed sets of values: their consumers (training engine and DDP setup, patch sampler, perceptual
# loss) branch on exactly these, so anything else must be refused at load, not inside a Ray worker.
Precision = Literal["auto", "fp16", "fp32"]
SyncBN = Literal["auto", "on", "off"]
Schedule = Literal["constant", "warmup_cosine"]
PatchSampling = Literal["slice", "area"]
WindowMode = Literal["auto", "soft_tissue", "brain"]  # = ldct.metrics.WINDOW_MODES
PerceptualNet = Literal["vgg11", "vgg13", "vgg16", "vgg19"]
DebugLoss = Literal["loss_g", "loss_critic"]
DebugValue = Literal["nan", "inf"]
# A study's objectives: validation PSNR in the body, the fast image-quality mode's mean LCD AUC,
# 512² batch-1 FPS (ldct.study.objectives maps each to the metric a trial reports).
Objective = Literal["psnr_body", "lcd_auc", "fps"]
IQMode = Literal["off", "fast"]


class _Checked:
    """Checks every field at construction, so ``dataclasses.replace`` can't build what a profile can't."""

    def __post_init__(self) -> None:
        prefix, fields = _field_types(type(self))
        for name, annotation in fields:
            _coerce(getattr(self, name), annotation, prefix + name, strict=True)


@dataclass(frozen=True)
class HUNormalization(_Checked):
    """HU window mapped linearly onto [0, 1] for the network; travels with every checkpoint."""

    hu_min: float = -1024.0
    hu_max: float = 3072.0

    def to_unit(self, hu: Any) -> Any:
        """HU (tensor or array) -> clipped network input in [0, 1]."""
        span = self.hu_max - self.hu_min
        return ((hu - self.hu_min) / span).clip(0.0, 1.0)

    def to_hu(self, unit: Any) -> Any:
        """Network output in [0, 1] -> HU. Not clipped: callers decide what to do at the edges."""
        return unit * (self.hu_max - self.hu_min) + self.hu_min


@dataclass(frozen=True)
class DataConfig(_Checked):
    # DICOM root (Mayo 2016 or TCIA layout). Empty: the built-in set is generated and used.
    root: str = ""
    # Where the per-patient HU cache lives. Empty: <root>/../<name>-cache, or ~/.cache/ldct/builtin.
    cache: str = ""
    # Mayo series thickness to read ("1mm" or "3mm"); ignored for TCIA trees.
    mayo_thickness: str = "3mm"
    # Patients held out by name; everyone else trains. Empty test list: the last patient.
    val_patients: tuple[str, ...] = ()
    test_patients: tuple[str, ...] = ()
    patch_size: int = 64
    # Patches whose fraction of air pixels (HU < -900) exceeds this are redrawn.
    max_air_fraction: float = 0.9
    # Patches whose fraction of soft tissue (HU in [-160, 240]) is below this are redrawn (0 = off).
    min_tissue_fraction: float = 0.0
    # How a training patch's slice is drawn: "slice" (every slice alike) or "area" (by its size, so
    # every training pixel alike; at patch 64 a real 512² built-in slice weighs 5.4x a 256² phantom).
    patch_sampling: PatchSampling = "slice"
    # Training pairs' noise (low - full) scaled by a factor drawn uniformly in [low, high] per patch
    # (1, 1 = off): one cache, many dose levels. For quarter-dose pairs, [0.58, 1.73] spans doses
    # 0.5 to 0.1 (inserted variance ∝ 1/d - 1).
    noise_scale: tuple[float, float] = (1.0, 1.0)
    loader_workers: int = 0
    # Built-in set: number of phantom patients, slices per phantom, image size, dose, seed.
    builtin_phantoms: int = 6
    builtin_slices: int = 4
    builtin_size: int = 256
    builtin_dose: float = 0.25
    builtin_seed: int = 0
    # Cap on whole slices scored per validation (0 = all): validation must stay cheap.
    max_val_slices: int = 0
    # Gaussian/BM3D tuning on the validation split: each slice's central crop x crop pixels
    # (0 = whole slices). Whole slices by default: the central 128² of the real head slice is
    # uniform brain, where σ = 3 px won and then lost 6 dB to the LDCT input on the abdomen.
    tune_crop: int = 0
    # Window of the body metrics (psnr_body...): "auto" = from each slice's DICOM BodyPartExamined
    # (head: brain W80/L40, else soft tissue W400/L40; ldct.metrics.window_for), or one for all.
    window: WindowMode = "auto"


@dataclass(frozen=True)
class ModelConfig(_Checked):
    # Architecture (ldct.models registry): "encoder_decoder" (timm encoder + decoder, the paper's
    # generator) or "redcnn" (the RED-CNN baseline; train it with loss.lambda_adv = 0).
    arch: str = "encoder_decoder"
    encoder: str = "tf_efficientnetv2_m"
    # Indices into timm's feature_info. For tf_efficientnetv2_m, (2, 3, 4) are blocks.2/4/6, the
    # paper's stages 3, 5 and 7 (strides 8, 16, 32).
    out_indices: tuple[int, ...] = (2, 3, 4)
    # "none", "imagenet" (timm cache only, never a download) or a path to a weights file.
    encoder_weights: str = "none"
    decoder_channels: int = 64
    critic_channels: int = 64
    redcnn_channels: int = 96  # RED-CNN width (the paper's 96)


@dataclass(frozen=True)
class LossConfig(_Checked):
    lambda_adv: float = 1.0
    lambda_l1: float = 1.0  # λ₂
    lambda_perceptual: float = 0.1  # λ₃
    lambda_gp: float = 10.0
    perceptual_net: PerceptualNet = "vgg19"
    # Last VGG feature layer used (torchvision index into .features; 35 = relu5_4 as in WGAN-VGG).
    perceptual_layer: int = 35
    # "auto" (local file/torch cache if present, else seeded random), "imagenet" (must be on disk),
    # "random", or a path to a state_dict file.
    perceptual_weights: str = "auto"
    # False: refuse to train with a random perceptual network ("auto" falling back, or "random"),
    # because λ₃ tuned against a random filter bank does not transfer to the paper's λ₃.
    allow_random_perceptual: bool = True


@dataclass(frozen=True)
class OptimConfig(_Checked):
    lr: float = 1e-5
    betas: tuple[float, float] = (0.5, 0.9)
    # Critic lr = lr * critic_lr_ratio (the paper uses one lr for both).
    critic_lr_ratio: float = 1.0
    # Learning-rate schedule over train.iterations: "constant" (the paper) or "warmup_cosine"
    # (linear warm-up over `warmup` iterations, then cosine down to lr * min_lr_ratio).
    schedule: Schedule = "constant"
    warmup: int = 0
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class TrainConfig(_Checked):
    iterations: int = 100_000  # generator steps
    n_critic: int = 4
    batch_size: int = 128  # global batch, split over workers
    val_every: int = 1000
    checkpoint_every: int = 0  # 0 = at every validation
    log_every: int = 50
    seed: int = 0
    workers: int = 2
    # Elastic DDP (Ray Train V2): 0 = exactly `workers`; else start with as many workers as the
    # cluster has room for between this and `workers`, and resize (a restart from the last
    # checkpoint) as nodes come and go. The global batch stays batch_size at every size (split
    # as evenly as it goes, each rank's loss weighted by its share), so a resized run resumes
    # the same batch sequence with the same effective learning rate.
    min_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Torch intra-op threads per worker (0 = what Ray's CPU reservation implies).
    torch_threads: int = 0
    # "auto": fp16 autocast + channels_last on CUDA, plain fp32 on CPU.
    precision: Precision = "auto"
    # SyncBatchNorm in the generator's encoder: "auto" (on for GPU runs with more than one
    # worker, so BN sees the global batch), "on", "off". Needs CUDA: "on" on CPU is an error.
    sync_bn: SyncBN = "auto"
    # Test hooks. Make `debug_nan_loss` ("loss_g" or "loss_critic") `debug_nan_value` ("nan" or
    # "inf") at step `debug_nan_step` (0 = never), on rank `debug_nan_rank` (-1 = every rank),
    # only in runs whose lr lies in [debug_nan_min_lr, debug_nan_max_lr] (max 0 = no bound), so
    # one trial of a study can be made to fail.
    debug_nan_step: int = 0
    debug_nan_min_lr: float = 0.0
    debug_nan_max_lr: float = 0.0
    debug_nan_loss: DebugLoss = "loss_g"
    debug_nan_value: DebugValue = "nan"
    debug_nan_rank: int = -1
    # Test hook: after the report of step `debug_pause_step`, the first worker of the study to get
    # there creates `debug_pause_file` (holding its PID) and sleeps, so a test can SIGKILL it.
    debug_pause_step: int = 0
    debug_pause_file: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_train(self)

    def worker_range(self) -> int | tuple[int, int]:
        """Ray Train's ``num_workers``: ``workers``, or ``(min_workers, workers)`` when elastic."""
        return (self.min_workers, self.workers) if self.min_workers else self.workers


@dataclass(frozen=True)
class StudyConfig(_Checked):
    name: str = "loss_weights"
    trials: int = 20
    max_concurrent: int = 1
    seed: int = 0
    # Search ranges (log-uniform) of ldct.hyperparams.TUNED. λ₂ (loss.lambda_l1) stays 1, so the
    # loss weights are the ratios λ₃/λ₂ and λ_adv/λ₂; a pixel-loss arch (redcnn) searches lr only.
    lambda_perceptual_range: tuple[float, float] = (0.01, 1.0)
    lambda_adv_range: tuple[float, float] = (1e-3, 10.0)
    lambda_gp_range: tuple[float, float] = (1.0, 100.0)
    lr_range: tuple[float, float] = (1e-6, 1e-3)
    # Trials before TPE models the results (the paper's point and extra_points count among them);
    # 0 = max(2, trials // 3). Optuna's own default (10) exceeds a small study's whole budget.
    startup_trials: int = 0
    # Points evaluated right after the paper's λ's, each the paper point changed by
    # "key=value[;key=value]" over the tuned keys (e.g. "optim.lr=0.3"). Not clipped to the ranges.
    extra_points: tuple[str, ...] = ()
    # ASHA: validations before a trial may be stopped, and the halving rate.
    grace_validations: int = 1
    reduction_factor: int = 2
    max_failures: int = 1  # retries of a failed trial from its last checkpoint
    # CPUs held by each trial's driver function (it only waits on its trainer's workers).
    driver_cpus: float = 0.25
    tracking_uri: str = ""
    # Ray storage for trials and checkpoints ("" = ./runs); a cluster needs shared storage (s3://...).
    storage: str = ""
    # Optuna storage URL of the study ("" = sqlite <storage>/<name>.optuna.db; or e.g. postgresql://).
    optuna_storage: str = ""
    # Throughput bar for promotion (paper: 12.5 FPS at 512x512 on a T4).
    min_fps: float = 12.5
    # Attach model.onnx (the portable copy for consumers outside ldct) to each registered version.
    # The export costs ~10 s of CPU for a small generator, more for the paper's; `ldct-best export`
    # makes the deployable ONNX from the weights either way. The smoke profile turns it off.
    register_onnx: bool = True
    # Pareto study (ldct.study.pareto): Optuna maximises val PSNR and 512² batch-1 FPS together (no
    # ASHA); the last validation measures FPS (`fps_repeats` timed calls, on the trial's device).
    pareto: bool = False
    # A categorical over architectures: a timm encoder name (arch encoder_decoder) or "redcnn".
    arch_choices: tuple[str, ...] = ()
    fps_repeats: int = 3
    # Other studies in the same MLflow store whose best completed trial (by validation PSNR) the
    # report scores beside this study's best, on the same test slices (e.g. ["redcnn"]). A study
    # not in the store is named in the report, not an error.
    compare: tuple[str, ...] = ()
    # The confirmatory repeat's endpoints (`ldct repeat --protocol loso`), named before the run:
    # "METRIC:ARM-REFERENCE>=MARGIN" (or "<=MARGIN" for a lower-is-better metric), e.g.
    # "psnr_body:tuned-ldct>=4.0" = mean over test slices of tuned minus the LDCT input's
    # psnr_body, target met when the mean reaches +4.0 and the 95 % t-interval lies above 0.
    # Names are checked against the metrics and arms when the repeat starts (ldct.study.endpoints).
    primary_endpoint: str = "psnr_body:tuned-ldct>=4.0"
    secondary_endpoints: tuple[str, ...] = ("psnr_body:tuned-bm3d>=1.0",)
    # What the study maximises (ldct.study.objectives): one objective = TPE + ASHA on it; two =
    # multi-objective TPE, no ASHA (a trial stopped on one objective would bias the other), and
    # the study registers the trial that ``selection`` names. pareto = true is the older spelling
    # of ["psnr_body", "fps"].
    objectives: tuple[Objective, ...] = ("psnr_body",)
    # Task-based image quality of every trial that reaches its last step (ldct.training.trial_iq):
    # "fast" = NPS shift against full dose and mean NPW AUC on the CCT189-like phantom, a few
    # seconds per trial; on whenever "lcd_auc" is an objective. ``iq_realizations``: the LCD
    # phantom's noise realizations (the water phantom's NPS uses a third of them, at least 10).
    iq: IQMode = "off"
    iq_realizations: int = 60
    # The registration rule, fixed before the run: "max OBJ [where OBJ2 >= VALUE | where OBJ2 >=
    # best - DELTA]" over the objectives; "" = "max psnr_body" (pareto: "where fps >= min_fps").
    selection: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_study(self)

    def effective_objectives(self) -> tuple[str, ...]:
        return ("psnr_body", "fps") if self.pareto else tuple(self.objectives)

    def iq_enabled(self) -> bool:
        return self.iq == "fast" or "lcd_auc" in self.effective_objectives()


@dataclass(frozen=True)
class DeployConfig(_Checked):
    """The precision gate of ``ldct-best validate`` (docs/DESIGN.md §5b): a reduced-precision path is
    judged against fp32 on the test split, in image-quality terms."""

    # Window-convention PSNR/SSIM of the path minus fp32's (mean over the panel), at most:
    gate_psnr_db: float = 0.02
    gate_ssim: float = 0.0005
    gate_max_abs_hu: float = 5.0  # largest |path - fp32| over every panel pixel
    gate_max_slices: int = 16  # test slices in the gate panel (evenly spread; 0 = all)
    calibration_slices: int = 16  # training slices for INT8 calibration (never test)


@dataclass(frozen=True)
class Config(_Checked):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    profile: str = "default"
    normalization: HUNormalization = field(default_factory=HUNormalization)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "study": StudyConfig,
    "deploy": DeployConfig,
}


@functools.cache
def _field_types(cls: type) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """(dotted prefix, ((field, annotation), ...)); cached: get_type_hints is slow per construction."""
    names = {c: name for name, c in SECTIONS.items()} | {HUNormalization: "normalization"}
    prefix = f"{names[cls]}." if cls in names else ""
    hints = typing.get_type_hints(cls)
    return prefix, tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


# Keys a former version had, with what to do instead. A profile or override naming one is refused;
# a stored config (a checkpoint's, a run's params) still loads, without it (from_flat).
RETIRED_KEYS = {
    "study.lambda_l1_range": (
        "λ₂ is no longer searched: a study keeps loss.lambda_l1 = 1 and searches λ₃/λ₂ and λ_adv/λ₂ "
        "(Adam ignores a global loss scale). Remove study.lambda_l1_range; set "
        "study.lambda_perceptual_range and study.lambda_adv_range (ratios to λ₂) instead"
    ),
}


def _coerce_section(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """``values`` converted to ``cls``'s field types; an unknown key raises, listing the known."""
    _, fields = _field_types(cls)
    hints = dict(fields)
    unknown = [key for key in values if key not in hints]
    retired = [key for key in unknown if f"{section}.{key}" in RETIRED_KEYS]
    if retired:
        raise ConfigError(f"{section}.{retired[0]} was removed: {RETIRED_KEYS[f'{section}.{retired[0]}']}")
    if unknown:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"unknown key {section}.{unknown[0]}; known keys of [{section}]: {known}")
    return {key: _coerce(value, hints[key], f"{section}.{key}") for key, value in values.items()}


def from_dict(tree: dict[str, Any], profile: str = "custom") -> Config:
    """Build a Config from a nested dict (a parsed TOML profile). Unknown sections/keys raise."""
    sections = {}
    for name, values in tree.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}]; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table, got {values!r}")
        sections[name] = SECTIONS[name](**_coerce_section(SECTIONS[name], values, name))
    return Config(profile=profile, **sections)


def profile_dirs() -> list[Path]:
    """Where named profiles are looked up, first match wins: the checkout's, then the packaged ones."""
    return [d for d in (CHECKOUT_PROFILE_DIR, PACKAGED_PROFILE_DIR) if d.is_dir()]


def list_profiles() -> dict[str, Path]:
    """Every named profile (``quick``, ``smoke``, ...) and the TOML file it loads from."""
    found: dict[str, Path] = {}
    for directory in profile_dirs():
        for path in sorted(directory.glob("*.toml")):
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def profile_path(profile: str | Path) -> Path:
    """Resolve a profile name (``quick``) or path (``my.toml``) to an existing TOML file."""
    candidate = Path(profile)
    if candidate.suffix == ".toml" and candidate.is_file():
        return candidate.resolve()
    named = list_profiles().get(str(profile))
    if named is not None:
        return named
    available = sorted(list_profiles())
    where = ", ".join(str(d) for d in profile_dirs()) or "no profile directory found"
    raise ConfigError(
        f"no profile {str(profile)!r}: give a .toml path or one of {available} (from {where}); "
        "`ldct profiles` lists them"
    )


def apply_overrides(config: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.key=value`` strings; unknown keys and wrong types raise ConfigError.

    A section's overrides apply together, so that fields checked against each other (e.g.
    ``train.min_workers`` and ``train.workers``) can change in any order; a later value of the
    same key wins."""
    grouped: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        items, changes = grouped.setdefault(section, ([], {}))
        items.append(item)
        changes[key] = raw.strip()
    for section, (items, changes) in grouped.items():
        try:
            config = _replace_section(config, section, changes)
        except ConfigError as exc:
            named = items[0] if len(items) == 1 else ", ".join(items)
            raise ConfigError(f"override {named!r}: {exc}") from exc
    return config


def load_config(profile: str | Path = "quick", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a TOML profile by name or path and apply strict overrides."""
    path = profile_path(profile)
    with path.open("rb") as fh:
        try:
            tree = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    name = path.stem
    try:
        config = from_dict(tree, profile=name)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return apply_overrides(config, overrides)


def to_flat(config: Config) -> dict[str, Any]:
    """Flat ``{"section.key": value}`` dict (tuples become lists), plus ``profile``."""
    flat: dict[str, Any] = {"profile": config.profile}
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(config, section)):
            value = getattr(getattr(config, section), f.name)
            flat[f"{section}.{f.name}"] = list(value) if isinstance(value, tuple) else value
    flat["normalization.hu_min"] = config.normalization.hu_min
    flat["normalization.hu_max"] = config.normalization.hu_max
    return flat


def from_flat(flat: dict[str, Any]) -> Config:
    """Inverse of :func:`to_flat`. Unknown keys raise; retired ones (``RETIRED_KEYS``, in configs
    stored by a former version) are dropped."""
    tree: dict[str, dict[str, Any]] = {}
    norm = {}
    profile = str(flat.get("profile", "custom"))
    for dotted, value in flat.items():
        if dotted == "profile" or dotted in RETIRED_KEYS:
            continue
        if "." not in dotted:
            raise ConfigError(f"flat key {dotted!r} has no section")
        section, key = dotted.split(".", 1)
        if section == "normalization":
            norm[key] = value
            continue
        tree.setdefault(section, {})[key] = value
    config = from_dict(tree, profile=profile)
    if norm:
        normalization = HUNormalization(**_coerce_section(HUNormalization, norm, "normalization"))
        config = dataclasses.replace(config, normalization=normalization)
    return config


def replace(config: Config, **sections: dict[str, Any]) -> Config:
    """The one way to derive a changed config: ``replace(cfg, loss={"lambda_l1": 2.0})``.

    Values are checked and converted as a profile's are (a list becomes a tuple, ``"3"`` an int,
    a value outside a ``Literal`` raises), and an unknown section or key raises ConfigError.
    ``dataclasses.replace`` on a section only checks, and changes one section at a time.
    """
    for section, changes in sections.items():
        if not isinstance(changes, dict):
            raise ConfigError(f"replace: {section}= must be a dict of fields, got {changes!r}")
        config = _replace_section(config, section, changes)
    return config


def _replace_section(config: Config, section: str, changes: dict[str, Any]) -> Config:
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
    values = _coerce_section(SECTIONS[section], changes, section)
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **values)})
