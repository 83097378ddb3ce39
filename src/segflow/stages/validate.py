"""Validate stage: per-image statistics checked by a Great Expectations suite.

Every image and mask of ``manifest.csv`` is decoded once; the facts about it (does it decode, sizes,
out-of-range mask values, a hash of the decoded pixels, pixel counts per class) become one row of a
DataFrame (segflow.data.image_statistics). A GX Checkpoint validates that DataFrame and renders the result
as HTML Data Docs; besides each file, it checks that there is something to learn (masks not mostly ignore,
enough images showing a class other than class 0). The stage writes ``stats.csv`` (read by the split stage),
``summary.json`` and ``data_docs/`` whether or not the data passes, then raises :class:`ValidationFailed` naming
the failing files if it did not.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.row_conditions import Column

from segflow import IGNORE_INDEX
from segflow.config import SplitParams, ValidateParams
from segflow.data.image_statistics import image_statistics
from segflow.data.manifest import (
    SPLITS,
    check_fractions,
    expected_split_sizes,
    has_predefined_splits,
    read_manifest,
)
from segflow.data.near_copies import near_copy_groups, pictures, split_groups
from segflow.data.report import profile, report
from segflow.errors import SegflowError, ValidationFailed
from segflow.fsutil import atomic_dir, atomic_write_json, atomic_write_text, refuse_overlap

log = logging.getLogger(__name__)

DOCS_SITE = "segflow"
SUITE_NAME = "segflow_data"
EXAMPLES_IN_MESSAGE = 5
IDS_IN_SUMMARY = 20
# Failing rows are reported by these columns; manifest_row is the key because image_id may repeat.
INDEX_COLUMNS = ["manifest_row", "image_id"]


@dataclass(frozen=True)
class ValidationResult:
    success: bool
    summary: dict[str, Any]
    out_dir: Path


@dataclass(frozen=True)
class _Check:
    """One expectation plus how to explain its failure to a person."""

    name: str
    expectation: gx.expectations.Expectation
    # Row checks: "{count}" and "{examples}" are filled in; table checks: "{observed}".
    failure: str
    path_column: str = "image_path"
    detail: Callable[[pd.Series], str] | None = None


def validate(cfg: ValidateParams, split_cfg: SplitParams, *, data_dir: Path, out_dir: Path) -> ValidationResult:
    """Check the ingested dataset in ``data_dir``; write stats.csv, summary.json and data_docs/ to ``out_dir``.

    Labeled images are counted in picture groups, as the split stage keeps them together (segflow.data.near_copies:
    identical pixels, export names, ``split.group_by`` keys and pixels that register onto each other); a predefined
    split whose
    test shares a picture with train is refused (near-copies in train and test inflate the test score) unless
    ``validate.allow_shared_pictures``."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    refuse_overlap(out_dir, [data_dir], "segflow validate")
    val_fraction, test_fraction = split_cfg.val_fraction, split_cfg.test_fraction
    check_fractions(val_fraction, test_fraction)
    minimums = {"train": cfg.min_train, "val": cfg.min_val, "test": cfg.min_test}
    manifest = read_manifest(data_dir)
    class_names, ignore_index = _read_classes(data_dir)
    stats, thumbnails = image_statistics(data_dir, manifest, len(class_names), ignore_index)
    _group_pictures(stats, thumbnails, manifest, split_cfg, data_dir / "manifest.csv")
    _mark_shared_pictures(stats)
    predefined = has_predefined_splits(manifest)
    warnings = [] if not predefined else [
        *_across_splits(stats, "picture", "picture(s) have copies"),
        *(_across_splits(stats, "split_group", "split.group_by group(s) have images") if split_cfg.group_by else [])]
    for warning in warnings:
        log.warning("%s", warning)
    checks = _checks(class_names, ignore_index, predefined, minimums, val_fraction, test_fraction,
                     refuse_shared_pictures=not cfg.allow_shared_pictures)
    if stats["mask_decodes"].any():  # with no mask to measure, any_labeled or mask_decodes already fails
        checks |= _learnable_checks(class_names, ignore_index, cfg.min_labeled_pixel_fraction,
                                    cfg.min_foreground_image_fraction)

    with atomic_dir(out_dir) as tmp:
        stats.to_csv(tmp / "stats.csv", index=False, lineterminator="\n")
        results = _run_checkpoint(stats, checks, tmp / "data_docs")
        failures = [_describe_failure(checks[name], result, stats) for name, result in results.items()]
        failures = [f for f in failures if f is not None]
        summary = {
            "success": not failures,
            "data_dir": str(data_dir),
            "checks_run": len(checks),
            "failures": failures,
            "warnings": warnings,
            "counts": _counts(stats, predefined, val_fraction, test_fraction),
            "classes": _class_frequencies(stats, class_names),
            "profile": profile(stats, class_names),
            "data_docs": "data_docs/index.html",
        }
        atomic_write_json(tmp / "summary.json", summary)
        atomic_write_text(tmp / "report.md", report(summary))

    if failures:
        lines = [f"- {f['check']}: {f['sentence']}" for f in failures]
        raise ValidationFailed(
            f"Data validation of {data_dir} failed {len(failures)} of {len(checks)} checks "
            f"(details: {out_dir / 'summary.json'}, {out_dir / 'data_docs' / 'index.html'}):\n" + "\n".join(lines)
        )
    return ValidationResult(success=True, summary=summary, out_dir=out_dir)


def _group_pictures(stats: pd.DataFrame, thumbnails: list, manifest: pd.DataFrame, split_cfg: SplitParams,
                    manifest_csv: Path) -> None:
    """Each labeled image's ``near_copy_group`` (pixels that register onto each other: the split stage joins it
    with the other links), ``picture`` (its near-copies) and ``split_group`` (those joined by split.group_by), as
    the split stage groups them; missing for the other images."""
    rows = stats["labeled"] & stats["content_hash"].notna()
    near = near_copy_groups([thumbnails[i] for i in np.flatnonzero(rows)], split_cfg.near_copy_similarity)
    stats["near_copy_group"] = pd.Series(pd.array(near, dtype="Int64"), index=stats.index[rows]).reindex(stats.index)
    picture_of = pictures(stats.loc[rows], manifest.loc[rows.to_numpy()])
    groups = split_groups(picture_of, manifest.loc[rows.to_numpy()], split_cfg.group_by, manifest_csv)
    for column, numbers in (("picture", picture_of), ("split_group", groups)):
        stats[column] = pd.Series(pd.array(numbers, dtype="Int64"), index=stats.index[rows]).reindex(stats.index)


def _mark_shared_pictures(stats: pd.DataFrame) -> None:
    """The leak checks' columns, on labeled images: how many predefined splits hold the same pixels, and whether
    the image's picture (its near-copies) is in test and in another split."""
    labeled = stats["labeled"] & stats["content_hash"].notna()
    stats["n_splits_with_same_content"] = (
        stats[labeled].groupby("content_hash")["split"].transform("nunique").astype("Int64"))
    splits = stats[labeled].groupby("picture")["split"]
    in_test = splits.transform(lambda s: (s == "test").any()) & splits.transform(lambda s: (s != "test").any())
    stats["test_picture_elsewhere"] = in_test.astype("boolean").reindex(stats.index)


def _across_splits(stats: pd.DataFrame, column: str, what: str, shown: int = 3) -> list[str]:
    """A warning for the groups of ``column`` whose labeled images sit in more than one predefined split."""
    labeled = stats[stats[column].notna()]
    spread = labeled.groupby(column)["split"].nunique()
    shared = spread[spread > 1].index
    if not len(shared):
        return []
    examples = [", ".join(f"{row.image_id} ({row.split})" for row in labeled[labeled[column] == group]
                          .itertuples()) for group in shared[:shown]]
    return [f"{len(shared)} {what} in more than one predefined split, so near-copies sit in train and in val or "
            f"test and inflate their scores: {'; '.join(examples)}{' and more' if len(shared) > shown else ''}."]


def _read_classes(data_dir: Path) -> tuple[list[str], int]:
    path = data_dir / "classes.json"
    try:
        classes = json.loads(path.read_text())
        names = [str(n) for n in classes["names"]]
    except FileNotFoundError:
        raise SegflowError(f"{path}: not found; run the ingest stage first.") from None
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise SegflowError(f"{path}: cannot read the class names ({exc}); re-run the ingest stage.") from None
    ignore_index = int(classes.get("ignore_index", IGNORE_INDEX))
    if not 0 < len(names) <= ignore_index:
        raise SegflowError(f"{path}: {len(names)} classes do not fit below the ignore index {ignore_index}.")
    return names, ignore_index


def _checks(
    class_names: list[str],
    ignore_index: int,
    predefined: bool,
    minimums: dict[str, int],
    val_fraction: float,
    test_fraction: float,
    *,
    refuse_shared_pictures: bool,
) -> dict[str, _Check]:
    """The suite, in the order it is reported."""
    expect = gx.expectations
    labeled = Column("labeled") == True  # noqa: E712 (builds a GX condition, not a Python comparison)
    last_class = len(class_names) - 1
    checks = [
        _Check(
            "image_decodes",
            expect.ExpectColumnValuesToBeInSet(
                column="image_decodes", value_set=[True], description="Every image file decodes."
            ),
            "{count} image file(s) do not decode: {examples}.",
            detail=lambda r: r["image_error"],
        ),
        _Check(
            "mask_decodes",
            expect.ExpectColumnValuesToBeInSet(
                column="mask_decodes",
                value_set=[True],
                description="Every mask decodes as a single-channel index image.",
            ),
            "{count} mask file(s) do not decode: {examples}.",
            path_column="mask_path",
            detail=lambda r: r["mask_error"],
        ),
        _Check(
            "image_size_matches_manifest",
            expect.ExpectColumnValuesToBeInSet(
                column="image_size_matches_manifest",
                value_set=[True],
                description="Each image has the width and height given in manifest.csv.",
            ),
            "{count} image(s) differ in size from manifest.csv: {examples}.",
            detail=lambda r: f"{r['image_width']}x{r['image_height']}, manifest says "
            f"{r['manifest_width']}x{r['manifest_height']}",
        ),
        _Check(
            "mask_size_matches_image",
            expect.ExpectColumnValuesToBeInSet(
                column="mask_size_matches_image",
                value_set=[True],
                description="Each mask has the same size as its image.",
            ),
            "{count} mask(s) differ in size from their image: {examples}.",
            path_column="mask_path",
            detail=lambda r: f"mask {r['mask_width']}x{r['mask_height']}, image {r['image_width']}x{r['image_height']}",
        ),
        _Check(
            "mask_values_in_range",
            expect.ExpectColumnValuesToBeBetween(
                column="n_bad_values",
                min_value=0,
                max_value=0,
                description=f"Mask values are class indices 0..{last_class} or the ignore index {ignore_index}.",
            ),
            f"{{count}} mask(s) hold values outside the classes 0..{last_class} and ignore {ignore_index}: "
            "{examples}.",
            path_column="mask_path",
            detail=lambda r: f"values {r['bad_values']}",
        ),
        _Check(
            "image_id_unique",
            expect.ExpectColumnValuesToBeUnique(column="image_id", description="image_id is unique."),
            "{count} row(s) share an image_id: {examples}.",
            detail=lambda r: f"image_id {r['image_id']}",
        ),
        _Check(
            "any_labeled",
            expect.ExpectTableRowCountToBeBetween(
                min_value=1, row_condition=labeled, description="At least one image has a mask."
            ),
            "no image has a mask; there is nothing to train on.",
        ),
    ]
    if predefined:
        checks.append(
            _Check(
                "split_names",
                expect.ExpectColumnValuesToBeInSet(
                    column="split",
                    value_set=list(SPLITS),
                    row_condition=labeled,
                    description="Every labeled row names a predefined split: train, val or test.",
                ),
                "{count} labeled row(s) have no valid split: {examples}.",
                detail=lambda r: f"split {r['split']!r}",
            )
        )
        if refuse_shared_pictures:
            checks += [
                _Check(
                    "no_split_leak",
                    expect.ExpectColumnValuesToBeBetween(
                        column="n_splits_with_same_content",
                        min_value=1,
                        max_value=1,
                        description="No picture (same decoded pixels) is in more than one predefined split.",
                    ),
                    "{count} labeled image(s) are the same picture as an image in another split: {examples}.",
                    detail=lambda r: f"{r['split']}, content {r['content_hash'][:12]}",
                ),
                _Check(
                    "no_near_copy_of_test",
                    expect.ExpectColumnValuesToBeInSet(
                        column="test_picture_elsewhere",
                        value_set=[False],
                        description="No test picture has a near-copy in train or val (segflow.data.near_copies; "
                                    "validate.allow_shared_pictures: false).",
                    ),
                    "{count} labeled image(s) are near-copies of one picture across test and another split (they "
                    "inflate the test score): {examples}. Move the copies into one split, or set "
                    "validate.allow_shared_pictures: true.",
                    detail=lambda r: f"{r['split']}, picture {r['picture']}",
                ),
            ]
        for split in SPLITS:
            checks.append(
                _Check(
                    f"min_{split}",
                    expect.ExpectTableRowCountToBeBetween(
                        min_value=minimums[split],
                        row_condition=labeled & (Column("split") == split),
                        description=f"Split {split} has at least {minimums[split]} labeled images (min_{split}).",
                    ),
                    f"split {split} has {{observed}} labeled image(s), fewer than min_{split}={minimums[split]}.",
                )
            )
    else:
        required = _groups_needed(minimums, val_fraction, test_fraction)
        sizes = expected_split_sizes(required, val_fraction, test_fraction)
        checks.append(
            _Check(
                "enough_labeled",
                expect.ExpectColumnUniqueValueCountToBeBetween(
                    column="split_group",
                    min_value=required,
                    row_condition=labeled,
                    description=(
                        f"At least {required} split groups of labeled pictures (identical pictures and "
                        f"split.group_by groups count once), so that splitting with "
                        f"val_fraction={val_fraction} and test_fraction={test_fraction} gives "
                        f"train/val/test {sizes['train']}/{sizes['val']}/{sizes['test']}, meeting "
                        f"min_train={minimums['train']}, min_val={minimums['val']}, min_test={minimums['test']}."
                    ),
                ),
                f"only {{observed}} split group(s) of labeled pictures (exact duplicates and split.group_by groups "
                f"count once); {required} are "
                f"needed for val_fraction={val_fraction}, test_fraction={test_fraction} to meet "
                f"min_train={minimums['train']}, min_val={minimums['val']}, min_test={minimums['test']}.",
            )
        )
    return {c.name: c for c in checks}


def _learnable_checks(class_names: list[str], ignore_index: int, pixels: float, foreground: float) -> dict[str, _Check]:
    """Data with nothing to learn: masks all (or nearly all) ignore, or labeled images showing only class 0."""
    expect = gx.expectations
    labeled = Column("labeled") == True  # noqa: E712 (builds a GX condition, not a Python comparison)
    checks = [
        _Check(
            "labeled_pixel_fraction",
            expect.ExpectColumnMeanToBeBetween(
                column="labeled_pixel_fraction",
                min_value=pixels,
                row_condition=labeled,
                description=f"On average at least {pixels:.1%} of a mask's pixels are labeled, not ignore "
                f"{ignore_index} (validate.min_labeled_pixel_fraction).",
            ),
            "the masks are on average {observed:.1%} labeled pixels (the rest is ignore "
            f"{ignore_index}), below validate.min_labeled_pixel_fraction={pixels:g}: there is little or nothing "
            "to learn. Were the masks read right (bit depth, value_map, ignore_value)?",
        ),
        _Check(
            "foreground_image_fraction",
            expect.ExpectColumnMeanToBeBetween(
                column="has_foreground",
                min_value=foreground,
                row_condition=labeled,
                description=f"At least {foreground:.1%} of the labeled images show a class other than class 0 "
                f"{class_names[0]!r} (validate.min_foreground_image_fraction).",
            ),
            "{observed:.1%} of the labeled images show a class other than class 0 "
            f"{class_names[0]!r}, below validate.min_foreground_image_fraction={foreground:g}: there is little "
            "or nothing to learn. Are the annotations empty, or were they not matched to their images?",
        ),
    ]
    return {c.name: c for c in checks}


def _groups_needed(minimums: dict[str, int], val_fraction: float, test_fraction: float) -> int:
    """Fewest distinct labeled pictures whose split by the fractions meets every minimum."""
    needed = max(1, sum(minimums.values()))
    # Start at a lower bound so that tiny fractions do not mean millions of steps: for a minimum
    # m >= 2, round(n * fraction) must reach m by itself (the at-least-one rule only lifts 0 to 1).
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        if minimums[split] >= 2:
            needed = max(needed, math.ceil((minimums[split] - 0.5) / fraction) - 1)
    # Split sizes grow with the count (the fractions leave train a positive share), so this ends.
    while any(expected_split_sizes(needed, val_fraction, test_fraction)[s] < m for s, m in minimums.items()):
        needed += 1
    return needed


def _run_checkpoint(stats: pd.DataFrame, checks: dict[str, _Check], docs_dir: Path) -> dict[str, Any]:
    """Validate ``stats`` with a Checkpoint whose UpdateDataDocsAction renders the HTML site into ``docs_dir``.

    Returns each check's ExpectationValidationResult by check name.
    """
    # Usage statistics must not leave the machine: the config below turns them off, and the environment
    # variable for any GX code that reads it instead.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # Ephemeral context: stores stay in memory, only the filesystem Data Docs site is written.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                # GX requires an absolute base_directory; the stage is usually given relative paths.
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.absolute()),
                },
            }
        },
    )
    context = gx.get_context(project_config=config, mode="ephemeral")
    batch_definition = (
        context.data_sources.add_pandas("segflow")
        .add_dataframe_asset("image_statistics")
        .add_batch_definition_whole_dataframe("all_images")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for check in checks.values():
        check.expectation.meta = {"check": check.name}
        suite.add_expectation(check.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="validate_images", data=batch_definition, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="segflow_validate",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
            # COMPLETE makes Data Docs list the failing rows by INDEX_COLUMNS; the partial lists
            # (first IDS_IN_SUMMARY rows) feed summary.json.
            result_format={
                "result_format": "COMPLETE",
                "partial_unexpected_count": IDS_IN_SUMMARY,
                "unexpected_index_column_names": INDEX_COLUMNS,
            },
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": stats}, run_id=RunIdentifier(run_name="validate"))
    return {
        result.expectation_config.meta["check"]: result
        for run in outcome.run_results.values()
        for result in run.results
    }


def _describe_failure(check: _Check, result: Any, stats: pd.DataFrame) -> dict[str, Any] | None:
    """None when the check passed, else the summary.json record with a sentence a person can act on."""
    if result.success:
        return None
    record: dict[str, Any] = {
        "check": check.name,
        "expectation": result.expectation_config.type,
        "description": check.expectation.description,
    }
    error = _exception_message(result)
    if error:
        record["sentence"] = f"could not be evaluated ({error})."
        return record
    details = result.result
    if "unexpected_count" not in details:  # a table-level expectation: one observed number
        record["observed"] = _plain(details.get("observed_value"))
        record["sentence"] = check.failure.format(observed=record["observed"])
        return record
    rows = stats.set_index("manifest_row").loc[[i["manifest_row"] for i in details["partial_unexpected_index_list"]]]
    paths = rows[check.path_column].tolist()
    count = int(details["unexpected_count"])
    shown = [
        f"{path} ({check.detail(row)})" if check.detail else path
        for path, (_, row) in zip(paths[:EXAMPLES_IN_MESSAGE], rows.iterrows())
    ]
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    record.update(
        count=count,
        image_ids=rows["image_id"].tolist(),
        paths=paths,
        sentence=check.failure.format(count=count, examples=", ".join(shown) + more),
    )
    return record


def _exception_message(result: Any) -> str:
    """GX reports a crash inside an expectation as a failed result with exception_info, sometimes per metric."""
    info = result.exception_info or {}
    candidates = [info] if "raised_exception" in info else list(info.values())
    raised = [i for i in candidates if isinstance(i, dict) and i.get("raised_exception")]
    return "; ".join(str(i.get("exception_message")) for i in raised)


def _plain(value: Any) -> Any:
    """numpy scalars (GX's observed values) as JSON-serialisable Python values."""
    return value.item() if isinstance(value, np.generic) else value


def _counts(stats: pd.DataFrame, predefined: bool, val_fraction: float, test_fraction: float) -> dict[str, Any]:
    labeled = stats[stats["labeled"]]
    groups = int(labeled["split_group"].nunique())
    counts: dict[str, Any] = {
        "images": len(stats),
        "labeled": len(labeled),
        "unlabeled": len(stats) - len(labeled),
        "distinct_labeled_pictures": int(labeled["picture"].nunique()),  # near-copies count once
        "split_groups": groups,
        "predefined_splits": predefined,
    }
    if predefined:
        counts["labeled_per_split"] = {s: int((labeled["split"] == s).sum()) for s in SPLITS}
    else:
        counts["expected_split_sizes"] = expected_split_sizes(groups, val_fraction, test_fraction)
    return counts


def _class_frequencies(stats: pd.DataFrame, class_names: list[str]) -> dict[str, Any]:
    """Share of labeled, non-ignored pixels per class and how many images contain each class."""
    pixel_counts = stats[[f"px_{k}" for k in range(len(class_names))]].fillna(0).astype("int64")
    totals = pixel_counts.sum(axis=0).to_numpy()
    labeled_pixels = int(totals.sum())
    ignored = int(stats["px_ignore"].fillna(0).sum())
    return {
        "pixel_frequency": {
            name: (float(totals[k]) / labeled_pixels if labeled_pixels else 0.0) for k, name in enumerate(class_names)
        },
        "images_containing": {name: int((pixel_counts.iloc[:, k] > 0).sum()) for k, name in enumerate(class_names)},
        "ignored_pixel_fraction": ignored / (labeled_pixels + ignored) if labeled_pixels + ignored else 0.0,
    }
