"""Typed parameters: ``params.yaml`` is parsed once into :class:`Params`; errors name the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from segflow.errors import SegflowError, shown
from segflow.models.names import unknown_architecture

PARAMS_FILE = Path("params.yaml")
GROUP_COLUMN_PREFIX = "column:"  # split.group_by names a manifest column


def _architecture(name: str) -> str:
    if (problem := unknown_architecture(name)) is not None:
        raise ValueError(problem)
    return name


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_accepts_bool(arg) for arg in get_args(annotation)) or (
        get_origin(annotation) is Literal and any(isinstance(arg, bool) for arg in get_args(annotation)))


class _Section(BaseModel):
    # A misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML's true/false would otherwise pass as 1/0 (pydantic's lax mode): `epochs: true` is a mistake.
        if isinstance(value, bool) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number or text, not true/false")
        return value


class SynthParams(_Section):
    out: Path = Path("data/synthetic")
    seed: int = 0
    num_labeled: int = Field(128, ge=1)
    num_unlabeled: int = Field(96, ge=0)
    image_size: int = Field(96, ge=32)


class CocoSource(_Section):
    images: Path = Path("images")
    annotations: Path = Path("annotations.json")


class MaskFolder(_Section):
    images: Path
    masks: Path
    split: Literal["train", "val", "test"] | None = None


class MaskSourceParams(_Section):
    folders: list[MaskFolder] = Field(default_factory=list)
    classes: list[str] | None = None
    value_map: dict[int, int] = Field(default_factory=dict)
    ignore_value: int | None = Field(None, ge=0, le=255)


class DataParams(_Section):
    """Where the raw data lives; paths are relative to ``root``."""

    format: Literal["coco", "masks"] = "coco"
    root: Path = Path("data/synthetic")
    coco: CocoSource = Field(default_factory=CocoSource)
    masks: MaskSourceParams = Field(default_factory=MaskSourceParams)
    unlabeled: Path | None = Path("unlabeled")
    strict: bool = False

    @model_validator(mode="after")
    def _masks_need_folders(self) -> DataParams:
        if self.format == "masks" and not self.masks.folders:
            raise ValueError("data.masks.folders must list at least one {images, masks} pair when format is masks")
        return self


class ValidateParams(_Section):
    # A predefined split (data.folders[].split) whose pictures have copies in two splits is refused: the copies
    # inflate val and test. true: a warning instead.
    allow_shared_pictures: bool = False
    min_train: int = Field(8, ge=1)
    min_val: int = Field(2, ge=1)
    min_test: int = Field(2, ge=1)
    # Something to learn: the mean share of non-ignore pixels per mask, and the share of labeled images that
    # show a class other than class 0 (background), must reach these.
    min_labeled_pixel_fraction: float = Field(0.1, ge=0, le=1)
    min_foreground_image_fraction: float = Field(0.1, ge=0, le=1)


class SplitParams(_Section):
    seed: int = 0
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # Semi-supervised protocol: keep this share of the training images labeled; the rest become unlabeled
    # (masks hidden from training, kept to score the pseudo-labels). null: all labeled.
    labeled_fraction: float | None = Field(None, gt=0, le=1)
    # Near-copies share a split: a regular expression searched in each image's file name whose first group (or
    # whole match) names its group, e.g. "^(.+)_jpg\\.rf\\." for a labeling tool's augmented exports; or
    # "column:NAME" for a manifest column. null: only identical pixels are grouped.
    group_by: str | None = None
    # Near-copies share a split too (segflow.data.near_copies): identical pixels, a labeling tool's export names
    # (Roboflow's NAME_jpg.rf.HASH.jpg), and images whose grayscale thumbnails, registered onto each other (a
    # flip, a crop, a rotation undone), correlate at least this much. null: no registration.
    near_copy_similarity: float | None = Field(0.97, gt=0, le=1)

    @field_validator("group_by")
    @classmethod
    def _pattern_compiles(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(GROUP_COLUMN_PREFIX):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc})") from None
        return value

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("split.val_fraction + split.test_fraction must be below 1")
        return self


class AugmentParams(_Section):
    hflip: bool = True
    scale_min: float = Field(0.75, gt=0)
    scale_max: float = Field(1.25, gt=0)
    # Probabilities of albumentations' transforms on labeled images (segflow.data.augment); 0: off.
    rotate: float = Field(0.0, ge=0, le=1)
    rotate_limit: float = Field(10.0, ge=0, le=180)   # degrees either way
    shift_scale_rotate: float = Field(0.0, ge=0, le=1)
    elastic: float = Field(0.0, ge=0, le=1)
    brightness_contrast: float = Field(0.0, ge=0, le=1)
    hue_saturation: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _scale_range(self) -> AugmentParams:
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min {self.scale_min} is larger than scale_max {self.scale_max}")
        return self


class StrongAugmentParams(_Section):
    """Extra augmentation of pseudo-labeled images (ST++): each applied with its probability."""

    color_jitter: float = Field(0.8, ge=0, le=1)
    grayscale: float = Field(0.2, ge=0, le=1)
    blur: float = Field(0.5, ge=0, le=1)
    cutout: float = Field(0.5, ge=0, le=1)   # a random box is blanked and its pixels ignored by the loss


class ConsistencyParams(_Section):
    """Weak-to-strong consistency on the unlabeled images while training (FixMatch, UniMatch): the model's
    confident predictions on a crop are the targets of the same crop strongly perturbed (``pseudo_augment``
    without cutout) and CutMix-ed with another unlabeled crop."""

    weight: float = Field(0.0, ge=0)          # weight of the unlabeled loss; 0: off
    threshold: float = Field(0.95, ge=0, le=1)  # pixels predicted with less confidence teach nothing
    # Class-balanced thresholds (CBST) per unlabeled batch: a class's threshold is lowered, never raised, until at
    # least class_keep_fraction of the pixels the teacher gives it pass.
    class_balanced: bool = False
    class_keep_fraction: float = Field(0.5, gt=0, le=1)
    cutmix: float = Field(0.5, ge=0, le=1)    # probability that a crop gets a box of another unlabeled crop
    # Share of the training's optimizer steps over which the weight rises from 0 (Mean Teacher's sigmoid ramp-up):
    # from scratch the first targets come from a model that is itself still random.
    rampup: float = Field(0.0, ge=0, le=1)


class EmaParams(_Section):
    """Mean Teacher (Tarvainen & Valpola, NeurIPS 2017): an exponential moving average of the weights, in eval
    mode, predicts the consistency targets; it can also be the model that is validated, kept and registered."""

    decay: float = Field(0.0, ge=0, lt=1)   # ema = decay * ema + (1 - decay) * weights, each step; 0: off
    evaluate: bool = True                   # with decay > 0: the EMA weights are the model validated and kept


class LossParams(_Section):
    """The training loss: a weighted sum of the terms below (a weight of 0 leaves a term out). Cross-entropy carries
    the per-image (pseudo_weight) and per-class (class_weighting) weights; Dice, Focal and Lovasz come from
    segmentation_models_pytorch.losses and score the labeled images of a batch."""

    cross_entropy: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # cross-entropy's targets: (1 - s) one-hot + s / classes
    # OHEM (MMSegmentation's OHEMPixelSampler): cross-entropy over the pixels whose true-class probability is below
    # this, and at least ohem_min_kept per image, the hardest first; null: every pixel.
    ohem_threshold: float | None = Field(None, gt=0, le=1)
    ohem_min_kept: int = Field(100_000, ge=1)
    dice: float = Field(0.0, ge=0)     # multiclass soft Dice (Milletari et al., 2016)
    focal: float = Field(0.0, ge=0)    # Focal loss (Lin et al., 2017)
    focal_gamma: float = Field(2.0, ge=0)
    lovasz: float = Field(0.0, ge=0)   # Lovasz-Softmax (Berman et al., 2018)

    @model_validator(mode="after")
    def _some_term(self) -> LossParams:
        if not (self.cross_entropy or self.dice or self.focal or self.lovasz):
            raise ValueError("at least one of cross_entropy, dice, focal, lovasz must have a weight above 0")
        return self


class RecipeParams(_Section):
    """Overrides of an architecture's training recipe (segflow.models.recipes; `segflow models` shows each
    architecture's). null keeps the recipe's value."""

    optimizer: Literal["adamw", "sgd"] | None = None
    lr: float | None = Field(None, gt=0)                  # peak learning rate
    weight_decay: float | None = Field(None, ge=0)        # decoupled (adamw) or L2 (sgd)
    momentum: float | None = Field(None, ge=0, lt=1)      # sgd only
    lr_schedule: Literal["poly", "constant"] | None = None
    warmup_steps: int | None = Field(None, ge=0)          # linear warm-up from lr / 10
    new_layers_lr_mult: float | None = Field(None, gt=0)  # non-encoder layers' lr factor over loaded encoder weights
    bias_lr_mult: float | None = Field(None, gt=0)        # biases' lr factor
    norm_bias_decay: bool | None = None                   # false: no weight decay on norm weights and biases
    aux_weight: float | None = Field(None, ge=0)          # auxiliary heads' loss weight

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, include=set(RecipeParams.model_fields))


class TrainParams(RecipeParams):
    """How every architecture in ``archs`` trains; the recipe fields (inherited), set, override every
    architecture's recipe."""

    archs: list[str] = Field(default_factory=lambda: ["unet", "deeplabv3plus", "pspnet"], min_length=1)

    @field_validator("archs")
    @classmethod
    def _known_architectures(cls, value: list[str]) -> list[str]:
        return [_architecture(name) for name in value]
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    crop_size: int = Field(96, ge=16)
    class_weighting: bool = False   # SegNet's median frequency balancing of the loss
    class_weight_power: float = Field(1.0, gt=0, le=1)  # class_weighting's weights to this power (0.5: square roots)
    prior_init: bool = True  # the class scores' bias starts at the class prior (Lin et al. 2017), see train.prior_bias
    amp: bool = True
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Exact-resume checkpoint (models/.NAME.resume) each validated epoch and also every this many optimizer steps.
    checkpoint_every_steps: int = Field(0, ge=0)   # 0: each validated epoch only
    val_interval: int = Field(1, ge=1)        # validate (and checkpoint) every N epochs and after the last
    # Early stopping: training ends after this many validations without a better val mIoU (train.epochs is
    # then the most it trains; the learning-rate schedule stays the one over train.epochs). null: never.
    patience: int | None = Field(None, ge=1)
    accumulate_steps: int = Field(1, ge=1)   # optimizer step every N batches: batch_size x N x processes
    sync_batchnorm: bool = True               # batch-norm statistics over all processes under torchrun
    compile: bool = False                     # torch.compile the model (falls back to eager if it fails)
    decoded_cache: bool = True               # read images from data/cache (segflow cache), not decode them
    # Random scale, crop and flip per batch on the training device, not per image in the loader; auto: on CUDA.
    batch_augment: bool | Literal["auto"] = "auto"
    # Train on the teacher's pseudo-labels (and train.consistency) too: true, false, or auto: when the teacher
    # stage's semi-supervised teacher beat its labeled-only twin on val (metrics/semi_supervised.json).
    use_pseudo_labels: bool | Literal["auto"] = "auto"
    pseudo_weight: float = Field(1.0, ge=0)
    # class_weighting's weights on pseudo-labeled and unlabeled pixels: full (as on labeled pixels: the targets
    # are prior-corrected, so both losses teach the same weighted probabilities), sqrt (softened) or none.
    unlabeled_class_weighting: Literal["none", "sqrt", "full"] = "full"
    # Share of pseudo-labeled images among an epoch's samples, the smaller set repeated to reach it: 0.5 repeats
    # few labeled images to match many pseudo-labeled ones (ST++), or a few unlabeled frames of the deployment
    # domain to match many labeled ones; null: every image once.
    pseudo_share: float | None = Field(0.5, gt=0, lt=1)
    # Warm start: a model folder (models/unet) or a registered model (models:/segflow@champion) of the same
    # architecture and options gives the initial weights; a head for other classes starts afresh.
    init_from: str | None = None
    loss: LossParams = Field(default_factory=LossParams)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    pseudo_augment: StrongAugmentParams = Field(default_factory=StrongAugmentParams)
    consistency: ConsistencyParams = Field(default_factory=ConsistencyParams)
    ema: EmaParams = Field(default_factory=EmaParams)


class TeacherParams(_Section):
    """The teacher stage trains ``arch`` twice at the same budget (same optimizer steps, same initial weights):
    labeled-only, and with the unlabeled images (train.consistency with this weight, Mean Teacher targets). With
    ``warm_start`` both arms continue from a labeled-only teacher trained first, so the unlabeled images' targets
    come from a model that has learned something."""

    arch: str = "unet"
    epochs: int | None = Field(None, ge=1)  # null: train.epochs (the architectures get the same budget)
    warm_start: bool = True                 # both arms start from the labeled-only teacher's weights
    continue_epochs: int | None = Field(None, ge=1)  # warm_start: the arms' further epochs; null: epochs

    @field_validator("arch")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        return _architecture(value)

    snapshots: int = Field(2, ge=0)        # earlier checkpoints kept to rank pseudo-labels by stability (ST++)
    consistency_weight: float = Field(1.0, gt=0)  # the semi-supervised teacher's unlabeled loss weight
    # train.use_pseudo_labels auto: the unlabeled images are used when the semi-supervised teacher beats the
    # labeled-only one's val mIoU by more than this.
    margin: float = Field(0.01, ge=0)


class PseudoLabelParams(_Section):
    threshold: float = Field(0.7, ge=0, le=1)
    batch_size: int = Field(16, ge=1)
    # Class-balanced thresholds (CBST): a class's threshold is lowered to keep at least this share of the
    # pixels the teacher assigns to it, so rare classes are not wiped out by one global threshold.
    class_balanced: bool = True
    class_keep_fraction: float = Field(0.5, gt=0, le=1)
    # Train on this share of the pseudo-labeled images, the most reliable first (ST++; needs teacher.snapshots).
    reliable_fraction: float = Field(1.0, gt=0, le=1)
    # A teacher trained with train.class_weighting over-predicts the rare classes (weighted cross-entropy learns
    # probabilities proportional to weight x posterior): its probabilities are divided by weight ** this (0: as
    # they are, 1: the whole weighting undone); auto: the value of 0, 0.25, ..., 1 with the best val mIoU.
    prior_correction: float | Literal["auto"] = "auto"

    @field_validator("prior_correction")
    @classmethod
    def _correction_in_range(cls, value: float | str) -> float | str:
        if value != "auto" and not 0 <= value <= 1:
            raise ValueError("must be 'auto' or a number from 0 to 1")
        return value


class InferenceParams(_Section):
    """How logits are computed for a whole image (evaluation, pseudo-labels and ``segflow predict``); registering
    a model writes them, window made concrete, into its card: the served model predicts as it was evaluated."""

    mode: Literal["whole", "slide"] = "whole"
    crop_size: int | None = Field(None, ge=16)   # slide window; null: the model's training crop (its card's)
    stride: int | None = Field(None, ge=1)       # null: two thirds of the window
    windows_per_batch: int = Field(8, ge=1)      # slide windows per forward pass: memory against speed
    flip: bool = False                           # average with the horizontally flipped prediction
    scales: list[float] = Field(default_factory=lambda: [1.0])  # multi-scale TTA: probabilities averaged
    # What one image sent to the served model or to `segflow predict` may be (evaluation is not limited): its
    # pixels (null: 16 windows' worth, at least 4 megapixels; made concrete when registered) and its encoded size.
    max_pixels: int | None = Field(None, ge=1)
    max_image_mb: float = Field(16.0, gt=0)
    max_seconds: float = Field(30.0, gt=0)  # served model: a request's inference stops after this (a 400)

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, value: list[float]) -> list[float]:
        if not value or any(s <= 0 for s in value):
            raise ValueError("must list at least one scale, each above 0")
        return value


class CrfParams(_Section):
    """Fully connected CRF after the network (DeepLab v1/v2); evaluation reports mIoU with and without it."""

    enabled: bool = False
    iterations: int = Field(5, ge=1)
    bilateral_weight: float = Field(4.0, ge=0)     # w1: appearance kernel
    bilateral_xy_std: float = Field(67.0, gt=0)    # theta_alpha (pixels)
    bilateral_rgb_std: float = Field(3.0, gt=0)    # theta_beta (intensity levels)
    gaussian_weight: float = Field(3.0, ge=0)      # w2: smoothness kernel
    gaussian_xy_std: float = Field(1.0, gt=0)      # theta_gamma (pixels)


class EvaluateParams(_Section):
    batch_size: int = Field(8, ge=1)
    num_overlays: int = Field(4, ge=0)
    inference: InferenceParams = Field(default_factory=InferenceParams)
    crf: CrfParams = Field(default_factory=CrfParams)


class RegisterParams(_Section):
    # MLflow's registry search takes the name inside quotes: a quote or backslash would break it.
    model_name: str = Field("segflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    metric: Literal["miou", "mean_dice", "mean_class_accuracy", "pixel_accuracy"] = "miou"
    margin: float = Field(0.0, ge=0)
    # The floor no champion goes below, the first included (on the test split, in register.metric): beat
    # predicting the majority class everywhere by more than baseline_margin, and reach min_score.
    baseline_margin: float = Field(0.05, ge=0)
    min_score: float = Field(0.1, ge=0, le=1)
    floor: bool = True  # false: no floor (smoke runs on toy budgets only; the decision says so)


class MlflowParams(_Section):
    experiment: str = "segflow"
    # Embedded default: SQLite store and artifact folder inside the project; MLFLOW_TRACKING_URI overrides.
    tracking_uri: str | None = None
    artifact_root: Path = Path("mlartifacts")


class PredictParams(_Section):
    """``segflow predict``: batching and the competition CSV (inference follows evaluate.inference, or for a
    registered model the settings registered with it)."""

    batch_size: int = Field(8, ge=1)
    csv_size: tuple[int, int] = (64, 64)  # (height, width) every CSV mask is resized to (nearest)

    @field_validator("csv_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError("height and width must both be at least 1")
        return value


class ScheduleParams(_Section):
    """``segflow schedule``: the Prefect deployment that retrains on a cron schedule (needs a Prefect server)."""

    deployment: str = "scheduled"            # full name segflow-retraining/scheduled (flow/deployment)
    cron: str = "0 3 * * 1"                  # minute hour day-of-month month day-of-week
    timezone: str = "UTC"                    # IANA name the cron is read in
    work_pool: str = "segflow-pool"          # pool a worker polls (ignored by `segflow schedule --serve`)
    concurrency_limit: int = Field(1, ge=1)  # runs of the deployment at the same time
    on_overlap: Literal["enqueue", "cancel_new"] = "enqueue"  # a run due while the limit is reached
    dvc_remote: str | None = None            # pull before / push after; null: DVC's default remote, if any


class OrchestrateParams(_Section):
    """How the Prefect flow runs the DVC stages (not an input of any stage's result)."""

    slots: int = Field(1, ge=1)  # stages run at the same time; each gets a GPU, or its share of the CPU threads
    # Each architecture's train -> evaluate chain as a flow run on this Prefect work pool (a worker per machine or
    # pod), its inputs and outputs through DVC's default remote; null: in this process.
    work_pool: str | None = None
    work_pool_retries: int = Field(2, ge=0)  # a chain whose flow run failed or crashed is submitted again
    heartbeat_seconds: int = Field(60, ge=30)  # a chain's flow run silent 3x this long is crashed (worker gone)


class Params(_Section):
    synth: SynthParams = Field(default_factory=SynthParams)
    data: DataParams = Field(default_factory=DataParams)
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    split: SplitParams = Field(default_factory=SplitParams)
    train: TrainParams = Field(default_factory=TrainParams)
    teacher: TeacherParams = Field(default_factory=TeacherParams)
    pseudo_label: PseudoLabelParams = Field(default_factory=PseudoLabelParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    register_: RegisterParams = Field(default_factory=RegisterParams, alias="register")
    mlflow: MlflowParams = Field(default_factory=MlflowParams)
    predict: PredictParams = Field(default_factory=PredictParams)
    schedule: ScheduleParams = Field(default_factory=ScheduleParams)
    orchestrate: OrchestrateParams = Field(default_factory=OrchestrateParams)
    # Per-architecture builder options, e.g. {"unet": {"encoder_name": "resnet18"}}.
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    @field_validator("models", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {k: (v or {}) for k, v in (value or {}).items()}

    @field_validator("models")
    @classmethod
    def _options_of_known_architectures(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, options in value.items():
            _architecture(name)
            if "recipe" in options:  # validated here so that a mistake names models.ARCH.recipe.KEY
                try:
                    options["recipe"] = RecipeParams.model_validate(options["recipe"] or {}).overrides()
                except ValidationError as exc:
                    raise ValueError("; ".join(f"{name}.recipe.{_describe(e)}" for e in exc.errors())) from None
        return value


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key (misspelt?)"
    got = error.get("input")
    suffix = f" (got {shown(got)})" if error["type"] not in ("extra_forbidden", "missing") and not isinstance(got, dict) else ""
    return f"{key}: {message}{suffix}"


MAX_YAML_VALUES = 100_000  # values a params file may hold once its aliases are expanded


def _expanded_values(node: yaml.Node) -> int:
    """How many values ``node`` holds once every alias in it is expanded (counted once per shared node, in
    linear time; stops counting past MAX_YAML_VALUES)."""
    counted: dict[int, int] = {}

    def count(current: yaml.Node) -> int:
        if id(current) not in counted:
            children = current.value if isinstance(current, yaml.SequenceNode) else (
                [part for pair in current.value for part in pair] if isinstance(current, yaml.MappingNode) else [])
            counted[id(current)] = min(MAX_YAML_VALUES + 1, 1 + sum(count(child) for child in children))
        return counted[id(current)]

    return count(node)


def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise SegflowError(f"{source}: invalid parameters: {problems}.") from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        loader = yaml.SafeLoader(path.read_text())
        try:  # composed once: counted before anything is expanded, then built from the same nodes
            node = loader.get_single_node()
            if node is not None and _expanded_values(node) > MAX_YAML_VALUES:
                raise SegflowError(f"{path}: its YAML aliases expand to more than {MAX_YAML_VALUES} values (an alias "
                                   "bomb?); write the values out, or use fewer nested aliases.")
            raw = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except FileNotFoundError:
        raise SegflowError(f"{path}: parameters file not found (run from the project folder).") from None
    except yaml.YAMLError as exc:
        raise SegflowError(f"{path}: not valid YAML ({exc}).") from None
    if raw is not None and not isinstance(raw, dict):
        raise SegflowError(f"{path}: expected a mapping of sections at the top level, found {type(raw).__name__}.")
    return parse_params(raw, str(path))


class Layout:
    """Where each stage writes, relative to the project folder (``dvc.yaml`` uses the same paths)."""

    ingested = Path("data/ingested")
    validation = Path("data/validation")
    splits = Path("data/splits.csv")
    pseudo = Path("data/pseudo")
    models = Path("models")
    metrics = Path("metrics")
    evaluation = Path("evaluation")
    plots = Path("plots")
    registry = Path("registry/decision.json")
    semi_supervised = Path("metrics/semi_supervised.json")  # the teacher stage's evidence and decision
    label_next = Path("reports/label_next.csv")  # unlabeled images, the most useful to annotate first
    leaderboard = Path("leaderboard")
    teacher = "teacher"
