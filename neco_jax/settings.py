"""The training settings: one frozen dataclass per config section, the one source of every training default.

Each field holds its default, the values it allows and whether changing it changes what a run computes
(`input_pipeline.settings.setting`); its comment says what it is, and the original's YAML name where that
differs (vpariza/NeCo experiments/configs/models/small/neco_dinov2.yml, whose values are the defaults). The
recipe configs are built from these defaults (`configs/base.py` calls `to_config`), the trainer reads a
config back with `from_config`, which is also where a value outside its field's choices or range stops the
run with one line naming it. The config's sections: `model`, `head`, `data` (the views' settings and the
loader's, `input_pipeline`), `optim`, `ema`, `loss`, `eval`, and the run's own fields at the top level.

No JAX here: configs build (and main.py answers a bad command line) without loading it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import ml_collections

from input_pipeline.settings import LoaderSettings, check, computes, from_section, setting, to_section
from input_pipeline.views import ViewSettings
from neco_jax.errors import ConfigError
from neco_jax.memory_fit import REMAT_VALUES
from neco_jax.models.archs import ARCHS, get_arch
from neco_jax.models.vit_config import ATTENTION_IMPLEMENTATIONS, DTYPES, ViTConfig

log = logging.getLogger(__name__)

# The values the loss's options allow, stated once (neco_jax/sorting.py and neco_jax/loss.py read them here).
NETWORKS = ("bitonic", "odd_even")  # diffsort's sorting networks
DISTRIBUTIONS = ("cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")  # diffsort's relaxations
SIMILARITIES = ("cosine", "euclidean")
LOSS_MASKS = ("all", "fg", "bg")
ON_NONFINITE = ("error", "skip")
# Fields older configs hold that are settings no more; a stored config.json with them still resumes.
RETIRED = {
    "loss.crops_for_assign",  # the anchor crops: always every global crop (the original requires it), now implied
    "model.remat_policy",  # what rematerialised blocks keep: now one of model.remat's choices
}


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The backbone (`config.model`): a named architecture (`neco_jax.models.ARCHS`) with its ViTConfig fields
    replaced, and its initial weights."""

    SECTION = "model"

    # The architecture (the original's `arch`, `arch_version` and `patch_size`).
    arch: str = setting("vit_small_patch14_dinov2", choices=tuple(sorted(ARCHS)))
    # Initial weights of student and teacher (the original's `pretrained_weights`): a pretrained name, a local
    # .pth/.pt/.ckpt/.safetensors file or a folder written by neco_jax.save_backbone, or "random" (tests, demo).
    # Not read on resume: the weights come from the checkpoint.
    init: str = setting("dinov2_vits14", computes=False)
    # ViTConfig fields replaced on top of the named arch, e.g. {"depth": 1} for smoke tests with random init.
    arch_overrides: dict = setting({})
    # 4 = DINOv2R; 0 with register weights = "XR" (the registers are dropped).
    num_register_tokens: int = setting(ViTConfig.num_register_tokens, at_least=0)
    # Stochastic depth of the student's last block (a linear schedule from 0); the teacher uses none.
    drop_path_rate: float = setting(0.1, at_least=0, below=1)
    # Compute dtype of the backbone's matmuls ("bfloat16" on GPUs); parameters stay float32.
    dtype: str = setting(ViTConfig.dtype, choices=DTYPES)
    # Rematerialisation of the ViT blocks in the backward pass (neco_jax/memory_fit.py; the same numbers): "auto"
    # compiles the step ahead and takes the cheapest of "none", "dots" (keep the matmul outputs, recompute the
    # elementwise work) and "full" (keep nothing: about one more forward pass) that fits the device's memory.
    remat: str = setting("auto", choices=REMAT_VALUES, computes=False)
    # Softmax attention (neco_jax/models/attention.py): "auto" keeps no N x N scores for the backward pass on
    # accelerators (cuDNN flash attention for bfloat16 on GPUs, else an exact chunked JAX attention; XLA's plain
    # path on the CPU at small sizes); or "xla", "chunked", "cudnn". The same numbers to rounding (bookkeeping).
    attention: str = setting(ViTConfig.attention, choices=ATTENTION_IMPLEMENTATIONS, computes=False)

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    """The projection head (`config.head`): Linear-GELU layers, then L2 normalisation."""

    SECTION = "head"

    hidden_dim: int = setting(2048, at_least=1)  # the original's `projection_hidden_dim`
    out_dim: int = setting(256, at_least=1)  # `projection_feat_dim`
    num_layers: int = setting(3, at_least=1)  # `n_layers_projection_head`

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """AdamW over the backbone and head groups, its schedules and the run's length (`config.optim`)."""

    SECTION = "optim"

    # Global batch (the original's is per GPU, on one GPU).
    batch_size: int = setting(64, at_least=1)
    num_epochs: int = setting(25, at_least=1)  # the original's `max_epochs`
    # 0: num_epochs * (dataset size // batch_size), the original's drop_last epochs; > 0 overrides (demo, tests).
    total_steps: int = setting(0, at_least=0)
    # AdamW learning rates of the backbone and the projection-head groups, decayed by a cosine without warmup ...
    lr_backbone: float = setting(1e-5, at_least=0)
    lr_heads: float = setting(1e-4, at_least=0)
    # ... to this floor (CosineAnnealingLR's eta_min).
    final_lr: float = setting(0.0, at_least=0)
    # Weight decay of the decayed groups at step 0, rising along a cosine towards weight_decay_end.
    weight_decay: float = setting(0.04, at_least=0)
    weight_decay_end: float = setting(0.5, at_least=0)
    # No decay on biases and 1-D parameters (norms, LayerScale gammas).
    exclude_norm_bias: bool = setting(True)
    # > 0: clip the global gradient norm of the trained parameters (the original's `grad_norm_clipping` is inert).
    grad_clip_norm: float = setting(0.0, at_least=0)
    # Blocks to train (the others, the embeddings and the final norm frozen): "" = all; "-n" = the last n blocks;
    # "n" = blocks n onwards; "i,j,k" = those blocks. The head always trains.
    trainable_blocks: str = setting("")
    # A non-finite step: "error" stops naming it; "skip" drops its update and counts it ...
    on_nonfinite: str = setting("error", choices=ON_NONFINITE)
    # ... and stops with the error after this many non-finite steps in a row.
    max_consecutive_skips: int = setting(10, at_least=1)

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True)
class EmaSettings:
    """The EMA teacher's momentum (`config.ema`): rising along a cosine from `momentum` towards `momentum_end`
    (never reached: the schedule stops one step short)."""

    SECTION = "ema"

    momentum: float = setting(0.9995, at_least=0, at_most=1)  # the original's `momentum_teacher`
    momentum_end: float = setting(1.0, at_least=0, at_most=1)  # `momentum_teacher_end`

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The NeCo loss (`config.loss`, neco_jax/loss.py). The teacher's anchors are always all global crops (the
    original's `crops_for_assign` must list them all)."""

    SECTION = "loss"

    # False: the student (a second forward pass) is its own teacher.
    use_teacher: bool = setting(True)
    # k x k aligned grid of each crop pair's overlap: k^2 reference patches and k^2-element sorts.
    roi_align_kernel_size: int = setting(7, at_least=1)
    # diffsort steepness of the student's and of the teacher's sorter.
    student_steepness: float = setting(100.0, above=0)
    teacher_steepness: float = setting(100.0, above=0)
    sort_net: str = setting("bitonic", choices=NETWORKS)
    # diffsort's relaxation (DiffSortNet's default).
    distribution: str = setting("cauchy", choices=DISTRIBUTIONS)
    # Similarity of patches to references: cosine, or Euclidean distance as torch.cdist.
    sim_dist: str = setting("cosine", choices=SIMILARITIES)
    # "all", or "fg"/"bg": only query patches inside/outside the teacher's attention mask (an ablation).
    loss_mask: str = setting("all", choices=LOSS_MASKS)
    # References from a FIFO queue of teacher vectors (the original's `is_queue_usable`), else from the batch.
    use_queue: bool = setting(True)
    # Entries per anchor crop (the original divides it by the number of GPUs: one here).
    queue_length: int = setting(8192, at_least=1)
    # False: sample references from each queue's filled part only. True: the original's shared fill counter,
    # bumped once per anchor crop (twice per step), so early steps also draw never-written zero slots
    # (`update_queue` in vpariza/NeCo src/neco.py); for side-by-side comparisons with the original's first steps.
    queue_original_counter: bool = setting(False)

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Evaluation during training (`config.eval`), as the original validates every epoch: every `every_epochs`
    epochs (0 = never, which costs nothing) the evaluation job `config` (a configs/eval/*.py file) runs on the
    current teacher with the data in `data_dir`; eval_miou goes to metrics.jsonl, results to
    workdir/eval/epoch_<e>/. It only reads the teacher: changing it never changes the training."""

    SECTION = "eval"

    every_epochs: int = setting(0, at_least=0, computes=False)
    config: str = setting("configs/eval/voc_overcluster.py", computes=False)
    data_dir: str = setting("", computes=False)
    # Job fields replaced, ";"-separated: "image_size=224;overcluster.ks=(21, 300)".
    set: str = setting("", computes=False)

    def __post_init__(self):
        check(self)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The run itself (the config's top level): seed, metrics and checkpoint periods, processes, export."""

    SECTION = ""

    seed: int = setting(400, at_least=0)  # the original's `--seed` default (seed_everything(400))
    # Metrics to metrics.jsonl and the console every this many steps.
    log_every_steps: int = setting(50, at_least=1, computes=False)
    # Asynchronous orbax checkpoints every this many steps, the newest keep_checkpoints kept.
    checkpoint_every_steps: int = setting(1000, at_least=1, computes=False)
    keep_checkpoints: int = setting(3, at_least=1, computes=False)
    # Several processes (neco_jax/distributed.py): seconds for all of them to reach the coordinator at start,
    # and steps between their exchanges of stop requests (a SIGTERM to any one stops all at the same step).
    init_timeout_s: int = setting(300, at_least=1, computes=False)
    stop_check_every_steps: int = setting(10, at_least=1, computes=False)
    # Write student and teacher backbones in PyTorch layout under workdir/export at the end.
    export_at_end: bool = setting(True, computes=False)

    def __post_init__(self):
        check(self)


# Config section -> the settings classes whose fields it holds ("" is the config's top level).
SECTIONS: dict[str, tuple[type, ...]] = {
    "": (RunSettings,),
    "model": (ModelSettings,),
    "head": (HeadSettings,),
    "data": (ViewSettings, LoaderSettings),
    "optim": (OptimSettings,),
    "ema": (EmaSettings,),
    "loss": (LossSettings,),
    "eval": (EvalSettings,),
}


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """A whole training config as settings objects, one per section (the data section's two apart)."""

    run: RunSettings = RunSettings()
    model: ModelSettings = ModelSettings()
    head: HeadSettings = HeadSettings()
    views: ViewSettings = ViewSettings()
    loader: LoaderSettings = LoaderSettings()
    optim: OptimSettings = OptimSettings()
    ema: EmaSettings = EmaSettings()
    loss: LossSettings = LossSettings()
    eval: EvalSettings = EvalSettings()


def _parts(settings: TrainSettings) -> dict[str, list[Any]]:
    """Config section -> the settings objects of `settings` that fill it."""
    parts = [getattr(settings, f.name) for f in dataclasses.fields(settings)]
    return {section: [p for t in types for p in parts if type(p) is t] for section, types in SECTIONS.items()}


def to_config(settings: TrainSettings = TrainSettings()) -> ml_collections.ConfigDict:
    """The ConfigDict of `settings` (by default every default): the top-level fields, then one section each."""
    config = ml_collections.ConfigDict()
    for section, parts in _parts(settings).items():
        values = {k: v for part in parts for k, v in to_section(part).items()}
        if section:
            config[section] = ml_collections.ConfigDict(values)
        else:
            config.update(values)
    return config


def from_config(config: ml_collections.ConfigDict | Mapping) -> TrainSettings:
    """The settings of a training config, each value checked against its field and a field no settings class has
    refused (one ConfigError line). What only a run needs is `check_runnable`'s."""
    config = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    for key, value in config.items():
        names = [f"{key}.{k}" for k in value] if key in SECTIONS and key else [key]
        unknown = [n for n in names if field_of(n) is None]
        if unknown:
            raise ConfigError(f"config.{unknown[0]} is not a training setting; see neco_jax/settings.py")
    built = {}
    for section, types in SECTIONS.items():
        for t in types:
            built[t] = from_section(t, config.get(section, {}) if section else config)
    settings = TrainSettings(**{f.name: built[type(f.default)] for f in dataclasses.fields(TrainSettings)})
    _check_crop_sizes(settings.views.size_crops, get_arch(settings.model.arch, **settings.model.arch_overrides))
    return settings


def _check_crop_sizes(sizes: tuple[int, ...], vit: ViTConfig) -> None:
    """A crop side that is not a multiple of the patch size: the patch embedding (a strided convolution) sees
    side // patch patches and drops the pixels past the last one. The original's DINOv2 backbones refuse such
    crops (`src/layers/patch_embed.py` asserts); its DINO backbone (`src/models/vit.py`, the ViTs with
    drop_path_mode "per_sample") drops them, as its DINO recipes' 98-px local crops at patch 16 do. So here too:
    refused for the first, a warning naming the dropped pixels for the second."""
    patch = vit.patch_size
    for kind, size in zip(("global", "local"), sizes):
        if size % patch == 0:
            continue
        what = (
            f"config.data.size_crops={sizes}: the {kind} crop side {size} px is not a multiple of the patch size "
            f"{patch} of {vit.arch}"
        )
        if vit.drop_path_mode != "per_sample":
            raise ConfigError(
                f"{what}, which the original's DINOv2 backbone refuses; use {size // patch * patch} or "
                f"{(size // patch + 1) * patch} px"
            )
        log.warning(
            "%s: the patch embedding sees %d x %d patches and drops the last %d pixel rows and columns of every "
            "%s crop, as the original does",
            what,
            size // patch,
            size // patch,
            size % patch,
            kind,
        )


def check_runnable(settings: TrainSettings) -> None:
    """What only a run needs (a recipe may leave them to the command line): initial weights, training images."""
    if not settings.model.init:
        raise ConfigError(
            "config.model.init is empty: name the initial weights, e.g. "
            "--config.model.init=/path/to/checkpoint.pth (or a pretrained name, or 'random')"
        )
    name = settings.loader.dataset_name
    if not settings.loader.data_dir and name != "sample" and not name.startswith("tfds:"):
        raise ConfigError(
            f"config.data.data_dir is empty: set --config.data.data_dir=/path/to/the/{name} images (the "
            "bundled sample photos train only with data.dataset_name='sample', as configs/demo.py does)"
        )


def field_of(dotted: str) -> dataclasses.Field | None:
    """The settings field of a config field ("optim.batch_size"; a key inside a free-form field such as
    "model.arch_overrides.depth" gives that field), or None when no settings class has it."""
    section, _, rest = dotted.partition(".")
    if section not in SECTIONS or not section:
        section, rest = "", dotted
    name = rest.split(".")[0]
    for t in SECTIONS[section]:
        for f in dataclasses.fields(t):
            if f.name == name:
                return f
    return None


def changes_computation(dotted: str) -> bool:
    """Whether a change of the config field `dotted` changes what a run computes (a field that is no setting,
    and not retired, is assumed to)."""
    field = field_of(dotted)
    if field is None:
        return dotted not in RETIRED
    return computes(field)


def default_of(dotted: str) -> Any:
    """The default of the config field `dotted` as a config holds it (JSON-like: tuples as lists)."""
    field = field_of(dotted)
    if field is None:
        raise KeyError(dotted)
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return list(value) if isinstance(value, tuple) else value
