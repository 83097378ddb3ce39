"""The command line turns user mistakes into one paragraph and a non-zero exit, never a traceback."""

import subprocess
import sys
from pathlib import Path

import yaml

SEGFLOW = str(Path(sys.executable).parent / "segflow")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SEGFLOW, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_broken_coco_file_exits_2_naming_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    annotations = tmp_path / "train.json"
    annotations.write_text("{not json")
    result = _run("ingest", "coco", "--images", "images", "--annotations", "train.json", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert "segflow: error:" in result.stderr and "train.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_wrong_parameter_type_exits_2_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"split": {"seed": "zero"}}))
    result = _run("split", cwd=tmp_path)
    assert result.returncode == 2
    assert "split.seed" in result.stderr and "Traceback" not in result.stderr


def test_train_needs_exactly_one_target(tmp_path):
    (tmp_path / "params.yaml").write_text("{}")
    result = _run("train", cwd=tmp_path)
    assert result.returncode == 2 and "--arch" in result.stderr


def test_models_lists_the_classic_line_with_the_paper_the_configured_size_and_the_recipe(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {weight_decay: 0.001}\n"
                                          "models: {fcn8s: {width: 0.25, recipe: {optimizer: sgd, lr: 0.05}}}\n")
    result = _run("models", cwd=tmp_path)
    assert result.returncode == 0
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:] if not line.startswith(" ")}
    for name in ("fcn8s", "segnet", "unet", "deeplabv3plus", "pspnet"):
        assert name in rows
    paper, configured = (float(count.removesuffix("M")) for count in rows["fcn8s"][2:4])
    assert paper > 100 and configured < paper / 10  # FCN-8s: 134M as published, ~8M at a quarter of the width
    assert rows["unet"][3] == "="  # not configured: as the paper
    assert "options: width=0.25 (default 1.0), batch_norm=True, encoder_weights=None" in result.stdout
    recipes = {}  # architecture -> its recipe line and its source line
    for line in result.stdout.splitlines()[2:]:
        if not line.startswith(" "):
            name = line.split()[0]
        elif line.strip().startswith(("recipe:", "from:")):
            recipes.setdefault(name, []).append(line.strip())
    # The paper's recipe, as params.yaml's train and models.fcn8s.recipe change it, with where it comes from.
    assert recipes["fcn8s"][0] == "recipe: sgd lr 0.05, momentum 0.9, weight decay 0.001, poly schedule, biases 2x lr"
    assert recipes["pspnet"][0].endswith("new layers 10x lr over a loaded encoder, aux weight 0.4")  # an aux head
    assert recipes["fcn8s"][1].startswith("from: Long et al. 2015 §4.3: SGD, momentum 0.9, lr 1e-4")
    assert "overridden in params.yaml: weight_decay=0.001; overridden in params.yaml: optimizer='sgd', lr=0.05" \
        in recipes["fcn8s"][1]
    assert recipes["pspnet"][0].startswith("recipe: adamw lr 0.001, weight decay 0.001")  # train's key: every one


def test_models_list_of_an_unknown_registered_model_names_it(tmp_path):
    (tmp_path / "params.yaml").write_text("{}")
    result = _run("models", "list", "no-such-model", cwd=tmp_path)
    assert result.returncode == 2
    assert "no registered model named 'no-such-model'" in result.stderr and "Traceback" not in result.stderr


def test_ingest_masks_needs_one_mask_folder_per_image_folder(tmp_path):
    result = _run("ingest", "masks", "--images", "a", "--masks", "b", "--masks", "c", "--out", "out", cwd=tmp_path)
    assert result.returncode == 2 and "one --masks" in result.stderr


def test_a_crash_exits_3_in_one_line_with_the_traceback_in_a_log(tmp_path, monkeypatch, capsys):
    import pytest

    from segflow import cli
    from segflow.stages import split

    def crash(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(split, "make_splits", crash)  # fault injection: a bug inside a stage
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["segflow", "split"])
    monkeypatch.setenv("DVC_STAGE", "split")
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 3
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert "segflow: internal error: ZeroDivisionError: division by zero" in stderr
    assert "`dvc checkout split` restores them" in stderr
    logs = list((tmp_path / ".segflow/crash-logs").iterdir())
    assert len(logs) == 1 and str(logs[0]) in stderr
    assert "Traceback" in logs[0].read_text() and "segflow split" in logs[0].read_text()


def test_a_full_disk_exits_2_naming_the_path_and_the_cause(tmp_path, monkeypatch, capsys):
    import errno

    import pytest

    from segflow import cli
    from segflow.stages import split

    def disk_full(*args, **kwargs):  # fault injection: the machine, not segflow, fails
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data/splits.csv"))

    monkeypatch.setattr(split, "make_splits", disk_full)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["segflow", "split"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert f"{tmp_path / 'data/splits.csv'}: No space left on device: the disk is full" in stderr
    assert "internal error" not in stderr and not (tmp_path / ".segflow/crash-logs").exists()


def test_killing_dvc_ends_the_stage_it_started_instead_of_leaving_an_orphan(tmp_path):
    import os
    import time

    import psutil

    from segflow.training.checkpoint import lock_path_for
    from train_testing import PLAIN_UNET, make_project, subprocess_env, write_params

    project = make_project(tmp_path, train=8)
    write_params(project, {"train": {"archs": ["unet_original"], "epochs": 1000, "batch_size": 4, "crop_size": 32,
                                     "device": "cpu", "decoded_cache": False, "use_pseudo_labels": False},
                           "models": {"unet_original": PLAIN_UNET}})
    # A stand-in for `dvc repro`: it starts the stage's command as DVC does, and is then killed with SIGKILL.
    dvc = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        "stage = subprocess.Popen(sys.argv[1:], env={**os.environ, 'DVC_STAGE': 'train@unet_original'})\n"
        "print(stage.pid, flush=True); time.sleep(600)"), SEGFLOW, "train", "--arch", "unet_original"],
        cwd=project, stdout=subprocess.PIPE, text=True, env=subprocess_env())
    stage = psutil.Process(int(dvc.stdout.readline()))
    lock = project / lock_path_for(project / "models/unet_original")
    deadline = time.monotonic() + 60
    while not lock.exists() and time.monotonic() < deadline:  # the training has begun
        time.sleep(0.2)
    assert lock.exists() and stage.is_running()
    os.kill(dvc.pid, 9)
    dvc.wait()
    gone, alive = psutil.wait_procs([stage], timeout=20)
    for orphan in alive:  # a failing test leaves nothing running behind it
        orphan.kill()
    assert gone, "the training went on as an orphan"
