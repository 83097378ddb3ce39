"""The ``segflow`` command: one subcommand per pipeline stage, each a thin call into its module."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from segflow.config import PARAMS_FILE, Layout, Params, SynthParams, load_params
from segflow.errors import INTERNAL_ERROR, SegflowError, environment_error

app = typer.Typer(
    help="segflow: from raw images to a registered, promoted segmentation model. "
    "Stages read params.yaml in the current folder; `dvc repro` runs them in order.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
ingest_app = typer.Typer(help="Turn raw labeled data into the ingest contract (masks/, manifest.csv, classes.json).",
                         no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
models_app = typer.Typer(help="Architectures (`segflow models`) and registered versions (`segflow models list NAME`).")
app.add_typer(models_app, name="models")

SYNTH = SynthParams()  # `segflow synth`'s defaults: params.yaml's synth section's
# The parameter counts `segflow models` shows are for PASCAL VOC's 20 classes and background, as the papers report.
PAPER_CLASSES = 21
ParamsOption = Annotated[Path, typer.Option("--params", help="Parameters file.")]
WithoutOption = Annotated[list[str] | None, typer.Option(
    help="Leave out this architecture (repeatable): the pipeline flow's work-pool path registers from the "
         "architectures that finished.")]


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write (replaced whole).")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes identical files.")] = SYNTH.seed,
    labeled: Annotated[int, typer.Option(help="Number of annotated images.")] = SYNTH.num_labeled,
    unlabeled: Annotated[int, typer.Option(help="Number of unlabeled images.")] = SYNTH.num_unlabeled,
    size: Annotated[int, typer.Option(help="Image height and width in pixels.")] = SYNTH.image_size,
    for_data_root: Annotated[Path | None, typer.Option(
        help="params.yaml's data.root (the DVC stage passes it): another folder leaves OUT empty, since nothing "
             "would read the synthetic images.")] = None,
) -> None:
    """Write the synthetic default dataset: COCO polygons (annotations.json, images/) plus unlabeled/."""
    from segflow.stages.synth import synth_stage

    summary = synth_stage(out, out if for_data_root is None else for_data_root, seed=seed, num_labeled=labeled,
                          num_unlabeled=unlabeled, image_size=size)
    typer.echo(f"wrote {out}: {summary}" if summary is not None else
               f"data.root is {for_data_root}: nothing reads {out}, left empty (no synthetic images written)")


@ingest_app.command("coco")
def ingest_coco_command(
    images: Annotated[Path, typer.Option(help="Folder of the images the COCO file lists.")],
    annotations: Annotated[Path, typer.Option(help="COCO instances JSON with polygon or RLE segmentations.")],
    out: Annotated[Path, typer.Option(help="Output folder (replaced whole on success).")] = Layout.ingested,
    unlabeled: Annotated[Path | None, typer.Option(help="Folder of unlabeled images.")] = None,
    strict: Annotated[bool, typer.Option(help="Treat missing or unlisted images as errors.")] = False,
) -> None:
    """Rasterize a COCO file into index masks (categories -> 1..K in ascending id, 0 = background)."""
    from segflow.stages.ingest import ingest_coco

    report = ingest_coco(images, annotations, out, unlabeled=unlabeled, strict=strict)
    typer.echo(f"ingested {out}: {report.labeled} labeled, {report.unlabeled} unlabeled, {len(report.warnings)} warnings")


@ingest_app.command("masks")
def ingest_masks_command(
    images: Annotated[list[Path], typer.Option(help="Folder of images; repeat for several splits.")],
    masks: Annotated[list[Path], typer.Option(help="Folder of index-PNG masks paired by file stem; one per --images.")],
    out: Annotated[Path, typer.Option(help="Output folder (replaced whole on success).")] = Layout.ingested,
    classes: Annotated[str | None, typer.Option(help="Class names in index order, comma-separated.")] = None,
    value_map: Annotated[str | None, typer.Option(help="Raw mask value mapping, e.g. 0:0,255:1.")] = None,
    ignore_value: Annotated[int | None, typer.Option(help="Raw mask value that means ignore.")] = None,
    split: Annotated[list[str] | None, typer.Option(help="Predefined split of each --images (train, val, test).")] = None,
    unlabeled: Annotated[Path | None, typer.Option(help="Folder of unlabeled images.")] = None,
    strict: Annotated[bool, typer.Option(help="Treat unpaired images or masks as errors.")] = False,
) -> None:
    """Ingest image + index-mask folders (CamVid style: --images train --masks trainannot --split train ...)."""
    from segflow.data.mask_folders import MaskSource, parse_value_map
    from segflow.stages.ingest import ingest_masks

    splits = split or [None] * len(images)
    if not (len(images) == len(masks) == len(splits)):
        raise SegflowError("segflow ingest masks: give one --masks (and, if any, one --split) per --images.")
    report = ingest_masks(
        [MaskSource(i, m, s) for i, m, s in zip(images, masks, splits)], out,
        classes=[c.strip() for c in classes.split(",")] if classes else None,
        value_map=parse_value_map(value_map) if value_map else None,
        ignore_value=ignore_value, unlabeled=unlabeled, strict=strict,
    )
    typer.echo(f"ingested {out}: {report.labeled} labeled, {report.unlabeled} unlabeled, {len(report.warnings)} warnings")


@ingest_app.command("from-params")
def ingest_from_params(params_file: ParamsOption = PARAMS_FILE) -> None:
    """Ingest what params.yaml's `data` section points at (the DVC stage)."""
    from segflow.stages.ingest import ingest_from_params as run

    report = run(load_params(params_file).data, Layout.ingested)
    typer.echo(f"ingested {Layout.ingested}: {report.labeled} labeled, {report.unlabeled} unlabeled")


@app.command()
def validate(
    data_dir: Annotated[Path, typer.Argument(help="Ingested folder.")] = Layout.ingested,
    out: Annotated[Path, typer.Option(help="Report folder: stats.csv, summary.json, data_docs/.")] = Layout.validation,
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """Run the Great Expectations suite; exit 1 naming the failing files when a check fails."""
    from segflow.stages.validate import validate as run

    params = load_params(params_file)
    run(params.validate_, params.split, data_dir=data_dir, out_dir=out)
    _log_data_docs(params, out)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"validation passed; Data Docs in {out / 'data_docs'}, this report in {out / 'report.md'}")


def _log_data_docs(params, out: Path) -> None:
    import mlflow

    from segflow.registry import tracking

    with tracking.stage_run(params.mlflow, "validate"):
        mlflow.log_artifacts(str(out / "data_docs"), artifact_path="data_docs")
        mlflow.log_artifact(str(out / "summary.json"))
        mlflow.log_artifact(str(out / "report.md"))


@app.command()
def split(params_file: ParamsOption = PARAMS_FILE) -> None:
    """Deterministic train/val/test split (stratified on class presence) unless the source defines one."""
    from segflow.stages.split import make_splits

    params = load_params(params_file)
    frame = make_splits(
        Layout.ingested, Layout.validation / "stats.csv", Layout.splits, seed=params.split.seed,
        val_fraction=params.split.val_fraction, test_fraction=params.split.test_fraction,
        labeled_fraction=params.split.labeled_fraction, group_by=params.split.group_by,
        summary_json=Layout.metrics / "split.json",
    )
    typer.echo(f"wrote {Layout.splits}: {frame['split'].value_counts().to_dict()}")


@app.command()
def cache(
    data_dir: Annotated[Path, typer.Argument(help="Ingested folder.")] = Layout.ingested,
    out: Annotated[Path | None, typer.Option(help="Cache folder (default data/cache; replaced whole).")] = None,
) -> None:
    """Decode every ingested image and mask once into .npy shards (train.decoded_cache reads them)."""
    from segflow.data.decoded_cache import CACHE_DIR
    from segflow.stages.cache import build_cache

    out = out or CACHE_DIR
    summary = build_cache(data_dir, out)
    typer.echo(f"wrote {out}: {summary.images} images ({summary.masks} with masks), {summary.shards} shard(s), "
               f"{summary.nbytes / 2**20:.1f} MiB")


@app.command()
def teacher(params_file: ParamsOption = PARAMS_FILE) -> None:
    """Train the teacher (params: teacher) labeled-only and with the unlabeled images at the same budget; keep the one
    val picks and write the decision to metrics/semi_supervised.json."""
    from segflow.stages.teacher import train_teacher  # torch and MLflow: seconds to import

    params = load_params(params_file)
    summary = train_teacher(params.teacher, params.train, model_options=params.models.get(params.teacher.arch, {}),
                            val_batch_size=params.evaluate.batch_size, inference=params.evaluate.inference,
                            mlflow_cfg=params.mlflow, data_dir=Layout.ingested, splits_csv=Layout.splits,
                            out_dir=Layout.models / Layout.teacher, metrics_file=Layout.semi_supervised)
    for arm in ("labeled_only", "with_unlabeled"):
        if arm in summary:
            scores = summary[arm]
            test = "–" if scores["test_miou"] is None else f"{scores['test_miou']:.4f}"
            typer.echo(f"teacher {arm.replace('_', ' ')}: val mIoU {scores['val_miou']:.4f}, test mIoU {test}, "
                       f"{scores['steps']} steps")
    typer.echo(f"unlabeled images {'used' if summary['use_unlabeled'] else 'not used'}: {summary['reason']}")


@app.command()
def train(
    arch: Annotated[str, typer.Option(help="Architecture name (see `segflow models`).")],
    resume: Annotated[bool, typer.Option(
        help="Continue a killed run from its last checkpoint (models/.NAME.resume), exactly as if uninterrupted.")] = False,
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """Train one architecture; the best checkpoint by val mIoU goes to models/NAME as safetensors.

    Under `torchrun --nproc_per_node N --no-python segflow train ...` it trains on N processes (one GPU each).
    """
    from segflow.stages.train import TrainRun
    from segflow.stages.train import train as run  # torch and MLflow: seconds to import
    from segflow.training.semi_supervised import architecture_params

    params = load_params(params_file)
    train_cfg, use_pseudo_labels = architecture_params(params.train, Layout.semi_supervised)
    result = run(train_cfg, arch, TrainRun(Layout.ingested, Layout.splits, Layout.models / arch,
                                           pseudo_dir=Layout.pseudo if use_pseudo_labels else None, resume=resume),
                 model_options=params.models.get(arch, {}), mlflow_cfg=params.mlflow,
                 val_batch_size=params.evaluate.batch_size, reliable_fraction=params.pseudo_label.reliable_fraction)
    typer.echo(f"best val mIoU {result.best_miou:.4f} at epoch {result.best_epoch} ({result.seconds:.0f} s), "
               f"{'with' if use_pseudo_labels else 'without'} the pseudo-labels")


@app.command("pseudo-label")
def pseudo_label(params_file: ParamsOption = PARAMS_FILE) -> None:
    """Predict the unlabeled images with the teacher; confident pixels become labels, the rest ignore."""
    from segflow.stages.pseudo_label import pseudo_label as run

    params = load_params(params_file)
    summary = run(params.pseudo_label, params.train, params.evaluate.inference, params.mlflow,
                  teacher_dir=Layout.models / Layout.teacher, data_dir=Layout.ingested,
                  splits_csv=Layout.splits, out_dir=Layout.pseudo, metrics_file=Layout.metrics / "pseudo_label.json",
                  label_next_file=Layout.label_next)
    typer.echo(f"pseudo-labeled {summary['images']} images, coverage {summary['coverage']:.1%}")


@app.command()
def evaluate(
    arch: Annotated[str | None, typer.Option(help="Architecture to evaluate (models/NAME).")] = None,
    teacher: Annotated[bool, typer.Option(help="Evaluate the teacher instead.")] = False,
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """Score on val (to choose) and test (to report): mIoU, per-class IoU, accuracy, Dice, baseline, pictures."""
    if teacher == (arch is not None):
        raise SegflowError("segflow evaluate: give exactly one of --arch NAME or --teacher.")
    from segflow.stages.evaluate import evaluate as run

    name = Layout.teacher if teacher else arch
    params = load_params(params_file)
    scores = run(params.evaluate, params.mlflow, name, device=params.train.device, model_dir=Layout.models / name,
                 data_dir=Layout.ingested, splits_csv=Layout.splits, metrics_file=Layout.metrics / f"{name}.json",
                 out_dir=Layout.evaluation / name, plots_dir=Layout.plots)
    typer.echo(f"{name}: val mIoU {scores['val']['miou']:.4f}, test mIoU {scores['test']['miou']:.4f}, "
               f"pixel accuracy {scores['test']['pixel_accuracy']:.4f}")


@app.command()
def register(
    force: Annotated[bool, typer.Option(
        help="Register even though the registry lacks versions this project registered before (registry/"
             "registrations.jsonl): starts a new history there.")] = False,
    without: WithoutOption = None,
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """Register the run's best model on val, the teacher included (alias challenger); promote it to champion if it
    clears the floor and wins the gate on test (exit 0 either way; the line says which)."""
    from segflow.stages.register import register as run

    params = load_params(params_file)
    decision = run(params.register_, params.mlflow, _test_split(params), candidates=_candidates(params, without),
                   evaluation_dir=Layout.evaluation, models_dir=Layout.models, out_file=Layout.registry, force=force)
    typer.echo(f"{decision.model_name} v{decision.version} ({decision.candidate}, {decision.arch}): "
               f"{'promoted to champion' if decision.promoted else 'kept as challenger, nothing promoted'} "
               f"({decision.reason})")


def _candidates(params: Params, without: list[str] | None) -> list[str]:
    """The run's models (``train.archs`` and the teacher) less the architectures ``without`` names."""
    unknown = sorted(set(without or []) - set(params.train.archs))
    if unknown:
        raise SegflowError(f"--without {', '.join(unknown)}: not in train.archs ({', '.join(params.train.archs)}).")
    return [name for name in [*params.train.archs, Layout.teacher] if name not in (without or [])]


def _test_split(params: Params):
    """The current test split, and how register and promote re-score a version on it (as evaluation predicts)."""
    from segflow.registry.promotion import TestSplit

    return TestSplit(Layout.ingested, Layout.splits, params.evaluate.batch_size, params.evaluate.inference)


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name (register.model_name).")],
    version: Annotated[str, typer.Option(help="Version to make champion (see `segflow models list NAME`).")],
    force: Annotated[bool, typer.Option(help="Skip the gate; needs --reason.")] = False,
    reason: Annotated[str | None, typer.Option(help="Why the gate is skipped (recorded in the history).")] = None,
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """Make a version champion through the register gate on the current test split (exit 1 if refused)."""
    from segflow.registry.mlflow_registry import PromotionRefused
    from segflow.registry.promotion import promote_version

    params = load_params(params_file)
    decision = promote_version(name, version, register=params.register_, mlflow_cfg=params.mlflow,
                               test=_test_split(params), force=force, reason=reason)
    if not decision.promoted:
        raise PromotionRefused(f"{name} v{version} not promoted: {decision.reason}.")
    typer.echo(f"{name} v{version} is now champion ({decision.reason})")


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name (register.model_name).")],
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """Point champion back at the previous champion in the model's champion history."""
    from segflow.registry.mlflow_registry import rollback as run

    replaced, restored = run(load_params(params_file).mlflow, name)
    typer.echo(f"{name}: champion rolled back from v{replaced} to v{restored}")


@app.command()
def predict(
    model: Annotated[str, typer.Option(help="Model folder (models/unet) or MLflow URI (models:/segflow@champion).")],
    images: Annotated[Path, typer.Option(help="Folder of images (png, jpg, jpeg, bmp, tif).")],
    out: Annotated[Path, typer.Option(help="Output folder: masks/ and overlays/ (replaced whole on success).")],
    csv: Annotated[Path | None, typer.Option(help="Also write image_id,mask rows at predict.csv_size.")] = None,
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """Predict every image in a folder: index masks, colour overlays and optionally a submission CSV."""
    from segflow.stages.predict import predict as run

    result = run(load_params(params_file), model=model, images_dir=images, out_dir=out, csv_file=csv)
    typer.echo(f"predicted {result.images} images into {result.out_dir}" + (f" and {result.csv_file}" if csv else ""))
    if result.refused:  # the others were predicted; these were not
        raise SegflowError(f"{len(result.refused)} image(s) not predicted: " + " ".join(result.refused.values()))


@app.command()
def leaderboard(without: WithoutOption = None, params_file: ParamsOption = PARAMS_FILE) -> None:
    """Rank the evaluated models (the teacher included) on val as register chooses: Markdown and JSON, also in MLflow."""
    from segflow.stages.leaderboard import leaderboard as run

    params = load_params(params_file)
    run(params.register_, params.mlflow, teacher_arch=params.teacher.arch, evaluation_dir=Layout.evaluation,
        metrics_dir=Layout.metrics, history_dir=Layout.plots / "history",
        names=_candidates(params, without), out_json=Layout.leaderboard / "leaderboard.json",
        out_markdown=Layout.leaderboard / "leaderboard.md", out_curves=Layout.plots / "learning_curves.csv")
    typer.echo((Layout.leaderboard / "leaderboard.md").read_text())


@app.command()
def schedule(
    serve: Annotated[bool, typer.Option(help="Also run the scheduled runs from this process (blocks until stopped; "
                                             "no worker needed).")] = False,
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """Create or update the Prefect deployment that retrains on params.yaml's schedule (needs PREFECT_API_URL)."""
    from segflow.orchestration.schedule import schedule as run

    params = load_params(params_file)
    cfg = params.schedule
    scheduled = run(params, Path.cwd(), serve=serve)
    if scheduled is not None:
        typer.echo(f"deployment {scheduled.deployment} runs on cron {cfg.cron!r} ({cfg.timezone}), at most "
                   f"{cfg.concurrency_limit} at a time, at {scheduled.api_url}; a worker runs them: "
                   f"prefect worker start --pool {cfg.work_pool}")


@models_app.callback(invoke_without_command=True)
def list_models(ctx: typer.Context, params_file: ParamsOption = PARAMS_FILE) -> None:
    """List the architectures: name, family, parameters with the paper's options and as params.yaml's `models`
    section configures them (for PAPER_CLASSES classes), each option with its default, the paper, and the training recipe (as
    params.yaml's train and models.NAME.recipe leave it) with its source."""
    if ctx.invoked_subcommand is not None:
        return
    from segflow import models
    from segflow.models.recipes import split_model_options

    params = load_params(params_file) if params_file.is_file() else None
    configured = params.models if params is not None else {}
    shared_recipe = params.train.overrides() if params is not None else {}
    typer.echo(f"Parameters for {PAPER_CLASSES} classes, with each paper's options and as configured by "
               f"{params_file if params_file.is_file() else '(no params.yaml here)'} (=: not configured there).")
    typer.echo(f"{'name':22s} {'family':14s} {'params: paper':>13s} {'configured':>10s}  paper")
    for name in models.available():
        info = models.describe(name)
        options, recipe_overrides = split_model_options(configured.get(name, {}))
        recipe = models.recipe(name, shared_recipe, recipe_overrides)
        counts = [_parameter_count(name, {}), _parameter_count(name, options) if options else None]
        shown = [f"{c / 1e6:.2f}M" if c is not None else "=" for c in counts]
        typer.echo(f"{name:22s} {info.family:14s} {shown[0]:>13s} {shown[1]:>10s}  {info.paper}")
        if info.default_options:
            typer.echo(f"{'':37s}options: " + ", ".join(
                f"{key}={options[key]!r} (default {value!r})" if options.get(key, value) != value else f"{key}={value!r}"
                for key, value in info.default_options.items()))
        typer.echo(f"{'':37s}recipe: {recipe.summary(info.aux)}")
        typer.echo(f"{'':37s}  from: {recipe.source}")
        if recipe.from_scratch:
            typer.echo(f"{'':37s}  from scratch: {recipe.from_scratch}")


def _parameter_count(name: str, options: dict) -> int:
    import torch

    from segflow import models

    options = {key: value for key, value in options.items() if key != "encoder_weights"}  # counting, not loading
    try:
        with torch.device("meta"):  # counts parameters without allocating them
            model = models.build(name, num_classes=PAPER_CLASSES, **options)
    except SegflowError:  # a few builders compute on tensors while building
        model = models.build(name, num_classes=PAPER_CLASSES, **options)
    return sum(p.numel() for p in model.parameters())


@models_app.command("list")
def list_registered_versions(
    name: Annotated[str, typer.Argument(help="Registered model name (register.model_name).")],
    params_file: ParamsOption = PARAMS_FILE,
) -> None:
    """List a registered model's versions: aliases, architecture, test score, test data, commit, time."""
    from segflow.registry.mlflow_registry import connect, format_versions, list_versions

    params = load_params(params_file)
    rows = list_versions(connect(params.mlflow), name, params.register_.metric)
    typer.echo(format_versions(rows, params.register_.metric))


def main() -> None:
    """Entry point: user mistakes become one paragraph on stderr and exit 1 or 2, a server that does not answer
    exit 4; a crash of segflow itself one line and exit 3, its traceback in a log file (segflow.errors: the codes)."""
    # Libraries stay at WARNING: Great Expectations and MLflow are chatty at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("segflow").setLevel(os.environ.get("SEGFLOW_LOG_LEVEL", "INFO"))
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    if os.environ.get("DVC_STAGE"):
        _end_with_parent()
    try:
        app()
    except Exception as exc:  # noqa: BLE001  (every failure ends as one paragraph and an exit code)
        # A tracking server that is down is no programming error either: say so in one paragraph too.
        error = exc if isinstance(exc, SegflowError) else _unreachable_server_error(exc) or environment_error(exc)
        if error is None:
            log_file = _write_crash_log(exc)
            typer.echo(f"segflow: internal error: {type(exc).__name__}: {exc}. This is a bug in segflow, not a "
                       f"problem with your input; the traceback is in {log_file}.{_dvc_recovery()}", err=True)
            sys.exit(INTERNAL_ERROR)
        typer.echo(f"segflow: error: {error}{_dvc_recovery()}", err=True)
        sys.exit(error.exit_code)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _end_with_parent() -> None:
    """Under ``dvc repro``: when DVC is killed (SIGKILL leaves it no time to stop its stage), this process gets
    SIGTERM instead of training on as an orphan; the next run resumes or restarts it. Linux only."""
    import ctypes
    import signal

    if sys.platform != "linux":
        return
    parent = os.getppid()
    if ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0 and os.getppid() != parent:
        sys.exit(f"segflow: the process that started this stage ({parent}) has ended; stopping.")


def _unreachable_server_error(exc: Exception) -> SegflowError | None:
    if "mlflow" not in sys.modules:  # nothing talked to a tracking server
        return None
    from segflow.registry.tracking import unreachable_server_error

    return unreachable_server_error(exc)


def _write_crash_log(exc: Exception) -> Path:
    """The traceback and the command line in ``.segflow/crash-logs/`` (the system's temporary folder if the
    project folder is not writable)."""
    import tempfile
    import time
    import traceback

    text = f"segflow {' '.join(sys.argv[1:])}\n\n{''.join(traceback.format_exception(exc))}"
    name = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
    for folder in (Path(".segflow/crash-logs"), Path(tempfile.gettempdir()) / "segflow-crash-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return (folder / name).resolve()
        except OSError:
            continue
    return Path("(unwritable: no crash log)")


def _dvc_recovery() -> str:
    """Under `dvc repro`, DVC removed the stage's previous outputs before running it: say how to get them back."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return ""
    return (f" DVC removed the previous outputs of stage {stage} before running it; `dvc checkout {stage}` "
            "restores them from its cache.")
