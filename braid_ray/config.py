"""One typed config, end to end: dataclass defaults <- YAML preset <- ``key=value`` overrides.

Every field says its unit and meaning. Unknown keys and ill-typed or out-of-range values raise
:class:`ConfigError` naming the dotted key, the value and what was expected, before any work starts.
The resolved config is a plain dict (``to_dict``) so it can be written to the run directory and
passed to Ray workers and Tune trials, which read nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from braid_ray.methods import BASELINES, METHODS, Penalty

# Registry names, declared here so that validating a config imports no registry (nor torch, pandas or pyarrow);
# tests/test_registry_names.py holds each one to its registry's keys.
TaskName = Literal["tfbind8", "tfbind5", "utr_mrl", "dhs", "csv"]  # braid_ray.data.tasks.TASKS
OracleName = Literal["table", "optimus5p", "trained_cnn", "kmer_ridge"]  # braid_ray.oracles.ORACLES
BackboneName = Literal["gaussian_onehot", "masked"]  # braid_ray.diffusion.pretrain.BACKBONES
PromptSetName = Literal["simple_animals", "animal_photos", "tiny"]  # braid_ray.images.prompts.PROMPT_SETS
LaionHeadName = Literal["laion_v2", "laion_v1"]  # braid_ray.images.aesthetic.LAION_HEADS
ZeroStage = Literal[1, 2, 3]  # braid_ray.images.zero.ZERO_STAGES

TASK_NAMES: tuple[str, ...] = typing.get_args(TaskName)
ORACLE_NAMES: tuple[str, ...] = typing.get_args(OracleName)
BACKBONE_NAMES: tuple[str, ...] = typing.get_args(BackboneName)
PROMPT_SET_NAMES: tuple[str, ...] = typing.get_args(PromptSetName)
LAION_HEAD_NAMES: tuple[str, ...] = typing.get_args(LaionHeadName)
ZERO_STAGE_NAMES: tuple[int, ...] = typing.get_args(ZeroStage)


class ConfigError(ValueError):
    """A config key or value a user must fix; the message names the key and the expected form."""


@dataclass
class RunConfig:
    dir: str = "runs/tfbind8"  # run directory: local path, or s3:// / gs:// URI
    seed: int = 0  # global seed; every split, member and sampler seed derives from it
    overwrite: bool = False  # replace a stage whose config changed (otherwise: stop with an error)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # in-process runs: auto = cuda when available, else cpu
    debug: bool = False  # launch scripts: a user error shows its full traceback instead of one line (exit 2)


@dataclass
class TaskConfig:
    name: str = "tfbind8"  # task registry name (TaskName): tfbind8 | tfbind5 | utr_mrl | dhs | csv
    path: str | None = None  # table to read; None = the task's bundled data (required for csv)
    sequence_column: str | None = None  # csv: column holding the sequences
    label_column: str | None = None  # csv: numeric column holding the measured label y
    subset: Literal["full", "ci"] = "full"  # utr_mrl: all 280k rows, or the 2k CI subset
    cell_type: Literal["HepG2", "K562", "GM12878", "hESCT0"] = "HepG2"  # dhs: target cell type
    length: int | None = None  # required sequence length (nt); None = the length most rows have
    invalid_letters: Literal["error", "drop"] = "error"  # letters outside ACGT(U): stop, or drop rows
    max_rows: int | None = None  # read only the first N rows of the table (quick runs); None = all


@dataclass
class DataConfig:
    oracle_fraction: float | None = None  # share of D held out as D_ora, in [0, 1); None = task default
    quantile: float | None = None  # D_off = D_0 rows with y below this quantile, in (0, 1); None = task default
    # A mutational scan instead of the quantile split (a benchmark where the reward must extrapolate from a local
    # library): D_off = the D_0 rows within this Hamming distance of a wild type; null = the quantile split.
    scan_radius: int | None = None
    # The scan's wild type, a sequence of D_0; null = a seeded draw among D_0's rows at data.quantile of y.
    wild_type: str | None = None


@dataclass
class OracleConfig:
    # oracle registry name (OracleName: table | optimus5p | trained_cnn | kmer_ridge); None = the task's default
    kind: str | None = None
    # An independent oracle reported beside the primary: a registry name, "auto" (kmer_ridge on D_ora where the
    # primary shares data with the reward, as Optimus 5-Prime does on utr_mrl), or null (none).
    secondary: str | None = "auto"
    # Settings of the CNN trained on D_ora, used only by kind=trained_cnn.
    channels: int = 64  # conv channels
    layers: int = 3  # conv layers
    kernel_size: int = 7  # conv kernel width (nt)
    hidden: int = 128  # width of the dense layers
    pool: int = 2  # max-pool factor after each conv block (skipped once the sequence is shorter than the kernel)
    dropout: float = 0.2  # dropout before the dense layers
    epochs: int = 20  # maximum passes over D_ora's training rows
    batch_size: int = 256  # rows per step
    lr: float = 1e-3  # Adam learning rate
    val_fraction: float = 0.1  # share of D_ora held out to report Pearson and stop early
    patience: int = 3  # epochs without validation improvement before stopping


@dataclass
class RewardConfig:
    members: int = 8  # M bootstrap members, each on its own with-replacement resample of D_off
    diverse: bool = False  # vary kernel width (1 = MLP-like) and activation across members
    spectral_norm: bool = True  # spectral-normalised layers: distance-aware features for the bonus
    channels: int = 32  # conv channels per member
    layers: int = 2  # conv layers per member
    kernel_size: int = 5  # conv kernel width (odd; the widest, when diverse)
    hidden: int = 64  # width of the dense layers = feature dimension d of the bonus
    pool: int = 1  # max-pool factor after each conv block (for long sequences)
    epochs: int = 30  # maximum epochs per member
    batch_size: int = 256  # rows per member per step
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    patience: int = 3  # epochs without out-of-bag improvement before a member stops
    holdout_fraction: float = 0.1  # share of D_off no member trains on: in-distribution calibration rows
    bonus_lambda: float = 1.0  # ridge lambda of the bonus
    whiten: bool = True  # whiten features (D_off mean and covariance) before the bonus


@dataclass
class DiffusionConfig:
    # Diffusion backbone registry name (BackboneName): gaussian_onehot (Gaussian diffusion over +-1 one-hot vectors)
    # | masked (absorbing-state discrete diffusion, MDLM-style; eta, clip_x0 and data_noise are the Gaussian's only)
    backbone: str = "gaussian_onehot"
    steps: int = 50  # T, denoising steps of the sampler (and of DDPM training; the masked loss is continuous-time)
    eta: float = 1.0  # DDIM eta: 1 = ancestral (DDPM posterior), 0 = deterministic (no KL possible)
    # Clip the predicted x0 to [-1, 1] at every reverse step (the data are +-1 one-hot). It fixes the first step
    # (the cosine schedule's last beta, 0.999, amplifies its noise-prediction error ~30x) but its Jacobian is
    # zero on clipped coordinates, which blocks the reward's gradient through the sampler: off by default.
    clip_x0: bool = False
    channels: int = 64  # denoiser conv channels
    blocks: int = 3  # denoiser residual blocks
    kernel_size: int = 5  # denoiser conv kernel width (nt)
    emb_dim: int = 64  # time-embedding width
    # Pretraining on the task's sequences (all of D, no labels).
    epochs: int = 12  # passes over the sequences (TFBind8: the loss plateaus by about epoch 12)
    batch_size: int = 256  # sequences per step (global; split over Ray workers)
    lr: float = 2e-3  # Adam learning rate (cosine decay)
    data_noise: float = 0.0  # std of Gaussian noise added to the +-1 one-hot training data


@dataclass
class FinetuneConfig:
    methods: list[str] = field(default_factory=lambda: ["strl", "braid_boot", "braid_bonus"])  # methods to run
    alpha: float = 1e-3  # KL weight, with the reward in z-score units of y over D_off
    strength: float = 1.0  # k: penalty strength of lcb / bonus, in units of std(r_hat) over D_off
    k: int = 20  # differentiable (last) sampler steps
    randomize_k: bool = False  # draw K uniformly from 1..k per batch (AlignProp)
    # mu_pre + sigma^2 c | mu_pre + sigma c | a trainable copy; masked backbone: residual = shift = x0 logits + c
    parameterization: Literal["residual", "shift", "full"] = "shift"
    # Steps before the last K: "kl" = the policy acts there too and pays its KL (eq. 6, the whole path's KL);
    # "pretrained" = the correction is off there (those steps are the pretrained policy's, KL exactly 0);
    # "auto" = kl for sequences, pretrained for images (where paying it takes two more UNet passes per step).
    early_steps: Literal["auto", "kl", "pretrained"] = "auto"
    # The last N sampler steps stay the pretrained model's (no correction, KL 0; the reward's gradient still runs
    # through them). Sequences only; 0 = the policy acts on the last step too.
    pretrained_last_steps: int = 0
    steps: int = 100  # optimizer steps at most (the cap of the plateau rule)
    # Plateau rule: stop once the mean objective of the last plateau_window steps is less than plateau_tol
    # (z-units) above that of the window before; 0 = off (always run finetune.steps).
    plateau_window: int = 0
    plateau_tol: float = 0.005
    batch_size: int = 32  # samples per optimizer step (global; split over Ray workers)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3  # Adam learning rate (cosine decay)
    clip: float = 1.0  # gradient-norm clipping (0 = off)
    # gaussian_onehot: softmax temperature of the relaxed one-hot the reward sees; masked: the Gumbel-softmax
    # temperature of the samples' straight-through gradient (forward, samples are hard whatever it is)
    temperature: float = 0.5
    straight_through: bool = False  # gaussian_onehot: hard one-hot forward, softmax gradient backward (masked: always)
    checkpoint_every: int = 50  # optimizer steps between checkpoints
    log_every: int = 10  # optimizer steps between progress lines
    monitor_queries: int = 0  # oracle queries per monitoring point (r over training; never in the loss); 0 = off
    monitor_every: int = 25  # optimizer steps between monitoring points


# finetune keys added after run directories and sweeps had been recorded, with their defaults: a record leaves
# such a key out while it holds its default, so what was recorded before the key existed still matches
FINETUNE_LATER_KEYS = {"pretrained_last_steps": 0}


def later_defaults(finetune: dict) -> tuple[str, ...]:
    """The FINETUNE_LATER_KEYS that a finetune section (a dict) leaves at their defaults, or lacks."""
    return tuple(k for k, default in FINETUNE_LATER_KEYS.items() if finetune.get(k, default) == default)


def without_later_defaults(finetune: dict) -> dict:
    """A finetune section (a dict) less the FINETUNE_LATER_KEYS that hold their defaults."""
    drop = later_defaults(finetune)
    return {k: v for k, v in finetune.items() if k not in drop}


@dataclass
class EvalConfig:
    n_samples: int = 640  # designs sampled per method and scored by the oracle
    batch_size: int = 640  # designs per sampling batch
    grad_ascent: bool = True  # add design-bench's Grad. row: gradient ascent on r_hat from the top of D_off
    grad_steps: int = 100  # Adam steps of that gradient ascent
    grad_lr: float = 0.1  # its learning rate on the logits
    # The validity rule (braid_ray/eval/validity.py): a design is invalid (hacked) when a limit drawn from D fails.
    hack_quantile: float = 0.01  # share of D's own rows each data-relative limit puts on the invalid side
    hack_min_run: int = 8  # the homopolymer limit is at least this long, whatever D's runs are
    hack_elbo_rows: int = 1024  # rows of D (a seeded sample) whose ELBO under the pretrained model sets its limit


@dataclass
class BaselinesConfig:
    """The paper's steering baselines, rows of the sequence evaluation beside the fine-tuned methods (no fine-tuning;
    docs/method.md, "Baselines"). Each list is a grid of settings; the evaluation spends SELECTION_QUERIES oracle
    queries per setting on designs apart from the evaluated ones and evaluates the best (as alpha is chosen)."""

    methods: list[str] = field(default_factory=list)  # rows to add (BaselineName): ddom | guidance | cfg; [] = none
    # DDOM and CFG (a conditional denoiser, classifier-free guidance):
    # the condition y, as quantiles of y over D_off (0.95 = its top-5% threshold, 1.0 = its best row)
    condition_quantiles: list[float] = field(default_factory=lambda: [0.95, 1.0])
    # CFG weights w (Ho & Salimans): eps = (1 + w) eps(x_t, y) - w eps(x_t); 0 = the conditional model alone
    cfg_weights: list[float] = field(default_factory=lambda: [0.0, 3.0, 10.0, 30.0])
    label_dropout: float = 0.15  # share of labelled rows trained without their label (the unconditional model)
    reweight: bool = False  # DDOM: draw D_off's rows with its binned weights favouring high y (DDOM, MINs)
    epochs: int | None = None  # training passes over each conditional model's rows; None = diffusion.epochs
    # Offline Guidance (classifier guidance on the pretrained model):
    # guidance scales s: the step's mean moves by s sigma_t^2 grad_x0 (r_hat - g_hat)/std_y at the predicted x0
    guidance_scales: list[float] = field(default_factory=lambda: [3.0, 10.0, 30.0, 100.0])
    guidance_penalty: Penalty = "none"  # its reward: r_hat (none), or a conservative r_hat - g_hat (min | lcb | bonus)


@dataclass
class RayConfig:
    address: str | None = None  # Ray cluster address; None = join the job's cluster or start a local one
    num_workers: int = 2  # Ray Train workers per trainer (global); 0 = run in-process, without Ray
    cpus_per_worker: float = 0.5  # CPUs reserved per worker (fractional keeps 2-core laptops from starving)
    use_gpu: bool = False  # one GPU per worker (NCCL between workers); every worker model and tensor on it
    # A local run.dir on a multi-node or autoscaling cluster is refused (workers would write checkpoints to
    # their own disks) unless it is a filesystem mounted on every node, which this declares.
    shared_filesystem: bool = False
    # An autoscaling cluster (the cluster/ presets pass ray.autoscaling=true): its worker nodes may not exist yet,
    # so resource checks are left to the autoscaler, a sweep plans for the fully scaled-up size
    # (sweep.cluster_max) and a local run.dir is refused even on one node.
    autoscaling: bool = False


@dataclass
class TrackingConfig:
    """Where fine-tuning metrics go besides the run directory's history (every step, rank-averaged)."""

    progress: Literal["auto", "bar", "lines"] = "auto"  # a progress bar on a terminal, log lines otherwise
    tensorboard: bool = False  # scalars under <run.dir>/tensorboard/<stage> (a local run.dir)
    mlflow_uri: str | None = None  # an MLflow tracking URI (pip install 'braid-ray[tracking]'); None = off
    ray_logs: bool = False  # show Ray's own log lines (worker stdout, Train's reporting) on the console


@dataclass
class ImageConfig:
    """Stable Diffusion fine-tuning (``domain: image``). The DDIM sampler takes its steps and eta from
    ``diffusion.steps`` / ``diffusion.eta``, the loop its settings from ``finetune.*``, the reward heads
    (MLP members over CLIP embeddings) theirs from ``reward.*``, and D_off its quantile from ``data.quantile``."""

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # SD hub id or local diffusers folder; "tiny" = toy SD (CPU)
    revision: str | None = None  # hub revision of model; None = the default branch
    clip_model: str = "openai/clip-vit-large-patch14"  # CLIP image encoder of the reward (hub id / folder); "tiny" = toy
    oracle: str = "laion_v2"  # evaluation-oracle head on the CLIP embedding (LaionHeadName): laion_v2 | laion_v1
    resolution: int = 512  # image side, pixels (a multiple of the VAE factor: 8 for SD v1.5, 2 for tiny)
    prompts: str = "simple_animals"  # named prompt set (PromptSetName; braid_ray/images/prompts.py)
    guidance_scale: float = 7.5  # classifier-free guidance weight w (1 = no guidance)
    lora_rank: int = 4  # LoRA rank on the UNet's attention projections; 0 = full fine-tuning (frozen copy as reference)
    frozen_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # dtype of the frozen VAE, text and image encoders
    offline_images: int = 2000  # images sampled from the pretrained model for D (ignored with offline_table)
    offline_table: str | None = None  # Parquet with image bytes (PNG/JPEG) and scores, instead of sampled images
    image_column: str = "image"  # offline_table: column of encoded image bytes
    score_column: str = "score"  # offline_table: numeric label column
    label_noise: float = 0.0  # std of Gaussian noise on the oracle's scores of sampled offline images (y = r + noise)
    embed_batch_size: int = 16  # images per Ray Data batch (offline sampling and CLIP embedding)
    embed_actors: int = 2  # Ray Data actor-pool size for offline sampling and embedding (global)
    grid_images: int = 16  # images per method in the evaluation sample grid


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO for the trainable UNet (or its LoRA parameters) of ``domain: image``. Batch sizes are not
    set here: they derive from finetune.batch_size (micro-batch per worker), finetune.grad_accum and the
    Ray world size."""

    # auto: 1 (optimizer state sharded) with LoRA, 2 (also gradients) for a full UNet; 3 (also the parameters)
    # only when asked
    zero_stage: int | Literal["auto"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # training precision of the trainable module
    optimizer: Literal["torch", "deepspeed"] = "torch"  # torch Adam (default), or DeepSpeed's Adam (compiles on CPU)
    offload_optimizer: bool = False  # keep optimizer states in CPU memory (ZeRO-Offload)
    overlap_comm: bool = False  # overlap gradient reduction with backward (GPUs)
    bucket_size: int = 50_000_000  # elements per reduce / all-gather bucket
    param_persistence_threshold: int = 100_000  # ZeRO-3: parameters with fewer elements stay whole on every rank
    save_frozen: bool = False  # LoRA: also write the frozen UNet weights into checkpoints (GBs for SD; tests check them)


@dataclass
class Config:
    domain: Literal["sequence", "image"] = "sequence"  # what is designed: sequences (task.*) or images (image.*)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, *names: str) -> dict[str, Any]:
        """The named sections as a dict, e.g. for a stage fingerprint."""
        return {n: dataclasses.asdict(getattr(self, n)) for n in names}


# --------------------------------------------------------------------------------------------
# Building a Config from nested dicts, with type checks that name the key.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")


def build_dataclass(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """A typed dataclass from a nested dict: unknown keys (with a did-you-mean) and bad values raise ConfigError
    naming the dotted key under ``prefix``; missing keys take the field's default."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: got {values!r}, expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {prefix}{key}{hint}; valid keys: {', '.join(prefix + n for n in names)}")
    kwargs = {}
    for name in names:
        if name not in values:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, values[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(values[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is a value, not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (``"a.b"``, parsed value); the value is read as YAML (``1e-3``, ``null``, ``[1, 2]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. finetune.alpha=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot read value {raw!r}: {e}") from None
    return key, value


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(tree).__name__}")
    return tree


def from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (as written by ``Config.to_dict``)."""
    cfg = build_dataclass(Config, tree, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file at ``path`` <- ``key=value`` overrides, validated."""
    tree = read_yaml(path) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return from_dict(tree)


# --------------------------------------------------------------------------------------------
# Value checks beyond types. Registry names are checked against the names declared above, so a bad name fails
# at load time without importing the registries.


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}, expected {expected}")


def validate_task(c: TaskConfig) -> None:
    """The ``task:`` section: a registered name, the columns a csv table needs, lengths and row counts."""
    _check(c.name in TASK_NAMES, "task.name", c.name, f"one of {sorted(TASK_NAMES)}")
    if c.name == "csv":
        for key in ("path", "sequence_column", "label_column"):
            if not getattr(c, key):
                raise ConfigError(f"task.{key}: required for task.name=csv (the table and its columns)")
    if c.name in ("tfbind8", "tfbind5") and (c.max_rows is not None or c.length is not None):
        raise ConfigError(f"task.max_rows / task.length: {c.name} always reads the whole 8-mer table "
                          "(its exact oracle needs every 8-mer); leave them null")
    if c.length is not None:
        _check(c.length >= 1, "task.length", c.length, "a positive number of nucleotides or null")
    if c.max_rows is not None:
        _check(c.max_rows >= 1, "task.max_rows", c.max_rows, "a positive row count or null")


def validate(cfg: Config) -> None:
    _check(bool(cfg.run.dir.strip()), "run.dir", cfg.run.dir, "a non-empty path or URI")
    _check(cfg.run.seed >= 0, "run.seed", cfg.run.seed, "an integer >= 0")
    validate_task(cfg.task)
    d = cfg.data
    if d.oracle_fraction is not None:
        _check(0.0 <= d.oracle_fraction < 1.0, "data.oracle_fraction", d.oracle_fraction, "a fraction in [0, 1)")
    if d.quantile is not None:
        _check(0.0 < d.quantile < 1.0, "data.quantile", d.quantile, "a quantile strictly between 0 and 1")
    if d.scan_radius is not None:
        _check(isinstance(d.scan_radius, int) and d.scan_radius >= 1, "data.scan_radius", d.scan_radius,
               "a Hamming distance >= 1, or null (the quantile split)")
        _check(cfg.domain == "sequence", "data.scan_radius", d.scan_radius, "null for domain: image (a scan is a "
               "sequence benchmark)")
    if d.wild_type is not None:
        _check(d.scan_radius is not None, "data.wild_type", d.wild_type, "null unless data.scan_radius is set")
        _check(bool(d.wild_type) and set(d.wild_type.upper()) <= set("ACGTU"), "data.wild_type", d.wild_type,
               "a sequence of A, C, G, T (or U)")
    o = cfg.oracle
    if o.kind is not None:
        _check(o.kind in ORACLE_NAMES, "oracle.kind", o.kind, f"one of {sorted(ORACLE_NAMES)} or null (task default)")
    if o.secondary not in (None, "auto"):
        _check(o.secondary in ORACLE_NAMES, "oracle.secondary", o.secondary,
               f"one of {sorted(ORACLE_NAMES)}, auto or null")
    _check(0.0 <= o.dropout < 1.0, "oracle.dropout", o.dropout, "a probability in [0, 1)")
    for key in ("channels", "layers", "kernel_size", "hidden", "pool", "epochs", "batch_size", "patience"):
        _check(getattr(o, key) >= 1, f"oracle.{key}", getattr(o, key), "an integer >= 1")
    _check(o.lr > 0, "oracle.lr", o.lr, "a positive learning rate")
    _check(0.0 < o.val_fraction < 1.0, "oracle.val_fraction", o.val_fraction, "a fraction in (0, 1)")
    r = cfg.reward
    for key in ("members", "channels", "layers", "kernel_size", "hidden", "pool", "epochs", "batch_size",
                "patience"):
        _check(getattr(r, key) >= 1, f"reward.{key}", getattr(r, key), "an integer >= 1")
    _check(r.kernel_size % 2 == 1, "reward.kernel_size", r.kernel_size, "an odd kernel width")
    _check(r.lr > 0, "reward.lr", r.lr, "a positive learning rate")
    _check(r.weight_decay >= 0, "reward.weight_decay", r.weight_decay, "a non-negative weight decay")
    _check(0.0 < r.holdout_fraction < 0.5, "reward.holdout_fraction", r.holdout_fraction, "a fraction in (0, 0.5)")
    _check(r.bonus_lambda > 0, "reward.bonus_lambda", r.bonus_lambda, "a positive ridge lambda")
    df = cfg.diffusion
    _check(df.backbone in BACKBONE_NAMES, "diffusion.backbone", df.backbone, " | ".join(map(repr, BACKBONE_NAMES)))
    for key in ("steps", "channels", "blocks", "kernel_size", "emb_dim", "epochs", "batch_size"):
        _check(getattr(df, key) >= 1, f"diffusion.{key}", getattr(df, key), "an integer >= 1")
    _check(df.eta >= 0, "diffusion.eta", df.eta, "eta >= 0")
    _check(df.lr > 0, "diffusion.lr", df.lr, "a positive learning rate")
    _check(df.data_noise >= 0, "diffusion.data_noise", df.data_noise, "a non-negative std")
    if df.backbone == "masked":  # settings of the Gaussian backbone that the masked one has no use for
        _check(df.eta == 1.0, "diffusion.eta", df.eta, "1.0 with diffusion.backbone=masked (a Gaussian DDIM setting)")
        _check(not df.clip_x0, "diffusion.clip_x0", df.clip_x0,
               "false with diffusion.backbone=masked (a Gaussian sampler setting)")
        _check(df.data_noise == 0, "diffusion.data_noise", df.data_noise,
               "0 with diffusion.backbone=masked (its data are letters, which noise would not mask)")
    ft = cfg.finetune
    for m in ft.methods:
        _check(m in METHODS, "finetune.methods", m, f"names from {sorted(METHODS)}")
    _check(ft.alpha >= 0, "finetune.alpha", ft.alpha, "alpha >= 0")
    _check(ft.alpha == 0 or df.eta > 0 or df.backbone == "masked", "finetune.alpha", ft.alpha,
           "0 when diffusion.eta=0 (the KL of a deterministic sampler is undefined)")
    _check(ft.strength >= 0, "finetune.strength", ft.strength, "a non-negative penalty strength")
    _check(1 <= ft.k <= df.steps, "finetune.k", ft.k, f"an integer in [1, diffusion.steps={df.steps}]")
    _check(0 <= ft.pretrained_last_steps < ft.k, "finetune.pretrained_last_steps", ft.pretrained_last_steps,
           f"an integer in [0, finetune.k={ft.k}) (the policy must act on one of the last K steps)")
    _check(not (ft.randomize_k and ft.pretrained_last_steps), "finetune.randomize_k", ft.randomize_k,
           "false with finetune.pretrained_last_steps > 0 (a drawn K <= N would leave no step of the policy's)")
    _check(cfg.domain == "sequence" or ft.pretrained_last_steps == 0, "finetune.pretrained_last_steps",
           ft.pretrained_last_steps, "0 with domain: image (a setting of the sequence samplers)")
    for key in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "monitor_every"):
        _check(getattr(ft, key) >= 1, f"finetune.{key}", getattr(ft, key), "an integer >= 1")
    _check(ft.monitor_queries >= 0, "finetune.monitor_queries", ft.monitor_queries, "an integer >= 0 (0 = off)")
    _check(ft.plateau_window >= 0, "finetune.plateau_window", ft.plateau_window, "an integer >= 0 (0 = off)")
    _check(ft.lr > 0, "finetune.lr", ft.lr, "a positive learning rate")
    _check(ft.clip >= 0, "finetune.clip", ft.clip, "a non-negative clipping norm (0 = off)")
    _check(ft.temperature > 0, "finetune.temperature", ft.temperature, "a positive temperature")
    _check(cfg.eval.n_samples >= 2, "eval.n_samples", cfg.eval.n_samples, "an integer >= 2")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "an integer >= 1")
    _check(cfg.eval.grad_steps >= 0, "eval.grad_steps", cfg.eval.grad_steps, "an integer >= 0")
    _check(cfg.eval.grad_lr > 0, "eval.grad_lr", cfg.eval.grad_lr, "a positive learning rate")
    _check(0 < cfg.eval.hack_quantile < 0.5, "eval.hack_quantile", cfg.eval.hack_quantile, "a share in (0, 0.5)")
    _check(cfg.eval.hack_min_run >= 2, "eval.hack_min_run", cfg.eval.hack_min_run, "an integer >= 2")
    _check(cfg.eval.hack_elbo_rows >= 10, "eval.hack_elbo_rows", cfg.eval.hack_elbo_rows, "an integer >= 10")
    validate_baselines(cfg)
    _check(cfg.ray.num_workers >= 0, "ray.num_workers", cfg.ray.num_workers, "an integer >= 0 (0 = in-process)")
    _check(cfg.ray.cpus_per_worker > 0, "ray.cpus_per_worker", cfg.ray.cpus_per_worker, "a positive CPU count")
    _check(not cfg.tracking.tensorboard or "://" not in cfg.run.dir, "tracking.tensorboard", True,
           "false with a bucket run.dir (TensorBoard writes local files); run TensorBoard on a local run.dir")
    validate_image_sections(cfg)


def validate_baselines(cfg: Config) -> None:
    """The ``baselines:`` section; the rows it adds only where they make sense (sequences; guidance needs noise)."""
    b = cfg.baselines
    for m in b.methods:
        _check(m in BASELINES, "baselines.methods", m, f"names from {sorted(BASELINES)}")
    _check(len(set(b.methods)) == len(b.methods), "baselines.methods", b.methods, "each name at most once")
    if b.methods:
        _check(cfg.domain == "sequence", "baselines.methods", b.methods,
               "[] with domain: image (the baselines are rows of the sequence evaluation)")
    if "guidance" in b.methods:
        _check(cfg.diffusion.backbone == "masked" or cfg.diffusion.eta > 0, "baselines.methods", b.methods,
               "no guidance with diffusion.eta=0: classifier guidance moves each step's mean by sigma_t^2 * grad, "
               "and a deterministic sampler has sigma_t = 0 (set diffusion.eta > 0)")
    for key, ok, expected in (("condition_quantiles", lambda q: 0 < q <= 1, "quantiles in (0, 1]"),
                              ("cfg_weights", lambda w: w >= 0, "weights >= 0"),
                              ("guidance_scales", lambda s: s >= 0, "scales >= 0")):
        values = getattr(b, key)
        _check(bool(values) and all(map(ok, values)), f"baselines.{key}", values, f"a non-empty list of {expected}")
    _check(0 < b.label_dropout < 1, "baselines.label_dropout", b.label_dropout,
           "a share in (0, 1) (CFG needs the unconditional model, learnt from rows without their label)")
    if b.epochs is not None:
        _check(b.epochs >= 1, "baselines.epochs", b.epochs, "an integer >= 1 or null (= diffusion.epochs)")


def validate_image_sections(cfg: Config) -> None:
    """The ``image:`` and ``deepspeed:`` sections; their registry names and methods only for ``domain: image``."""
    ds = cfg.deepspeed
    *lower, top = ZERO_STAGE_NAMES
    _check(ds.zero_stage == "auto" or ds.zero_stage in ZERO_STAGE_NAMES, "deepspeed.zero_stage", ds.zero_stage,
           f"'auto' (1 with LoRA, 2 for a full UNet), {', '.join(map(str, lower))} or {top}")
    _check(ds.bucket_size >= 1, "deepspeed.bucket_size", ds.bucket_size, "a positive number of elements")
    _check(ds.param_persistence_threshold >= 0, "deepspeed.param_persistence_threshold",
           ds.param_persistence_threshold, "a non-negative number of elements")
    im = cfg.image
    for key in ("resolution", "offline_images", "embed_batch_size", "embed_actors", "grid_images"):
        _check(getattr(im, key) >= 1, f"image.{key}", getattr(im, key), "an integer >= 1")
    _check(im.lora_rank >= 0, "image.lora_rank", im.lora_rank, "an integer >= 0 (0 = full fine-tuning)")
    _check(im.guidance_scale >= 1.0, "image.guidance_scale", im.guidance_scale, "a CFG weight >= 1 (1 = off)")
    _check(im.label_noise >= 0, "image.label_noise", im.label_noise, "a non-negative std")
    if cfg.domain != "image":
        return
    _check(im.prompts in PROMPT_SET_NAMES, "image.prompts", im.prompts, f"one of {sorted(PROMPT_SET_NAMES)}")
    _check(im.oracle in LAION_HEAD_NAMES, "image.oracle", im.oracle, f"one of {sorted(LAION_HEAD_NAMES)}")
    image_methods = [n for n, meth in METHODS.items() if "image" in meth.domains]
    for m in cfg.finetune.methods:
        _check(m in image_methods, "finetune.methods", m, f"names from {image_methods}")
    _check(im.offline_images >= 10 or im.offline_table is not None, "image.offline_images", im.offline_images,
           "at least 10 images (D_off and the reward's held-out rows are cut from them)")
