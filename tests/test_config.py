import pytest
import yaml

from segflow.config import load_params, parse_params
from segflow.errors import SegflowError


def test_repository_params_file_parses(project_root):
    params = load_params(project_root / "params.yaml")
    assert params.train.archs
    assert params.register_.model_name


def test_wrong_type_names_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": "ten"}}))
    with pytest.raises(SegflowError) as err:
        load_params(path)
    assert "train.epochs" in str(err.value) and str(path) in str(err.value)


def test_misspelt_key_is_rejected():
    with pytest.raises(SegflowError, match=r"train\.epoch: unknown key"):
        parse_params({"train": {"epoch": 3}})


def test_fractions_must_leave_training_data():
    with pytest.raises(SegflowError, match="val_fraction"):
        parse_params({"split": {"val_fraction": 0.5, "test_fraction": 0.5}})


def test_masks_format_needs_folders():
    with pytest.raises(SegflowError, match="data.masks.folders"):
        parse_params({"data": {"format": "masks"}})


def test_invalid_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed")
    with pytest.raises(SegflowError, match="not valid YAML"):
        load_params(path)


def _alias_bomb(depth: int, key: str = "archs") -> str:
    """A params file whose train.KEY holds 9 ** depth values once its aliases are expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{n}: &a{n} [*a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}, *a{n - 1}, "
              f"*a{n - 1}]" for n in range(1, depth + 1)]
    return "\n".join(lines).replace("a0:", "bombs:\n  a0:").replace("\na", "\n  a") + f"\ntrain:\n  {key}: *a{depth}\n"


def test_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(_alias_bomb(10))  # 3.5 billion values once expanded
    with pytest.raises(SegflowError, match="aliases expand to more than 100000 values") as err:
        load_params(path)
    assert str(path) in str(err.value) and len(str(err.value)) < 300


def test_an_invalid_value_is_echoed_cut_short(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(_alias_bomb(3, key="epochs"))  # 729 values (3.6 kB printed whole): under the bound, not a number
    with pytest.raises(SegflowError, match="train.epochs") as err:
        load_params(path)
    assert len(str(err.value)) < 600


def test_model_options_without_a_value_are_none():
    params = parse_params({"models": {"unet": {"encoder_name": "resnet18"}, "fcn8s": None}})
    assert params.models == {"unet": {"encoder_name": "resnet18"}, "fcn8s": {}}


@pytest.mark.parametrize("raw, message", [
    ({"train": {"epochs": True}}, "train.epochs: expected a number or text, not true/false"),
    ({"train": {"augment": {"scale_min": 1.5, "scale_max": 1.25}}}, "scale_min 1.5 is larger than scale_max 1.25"),
    ({"train": {"archs": []}}, "train.archs: List should have at least 1 item"),
    ({"register": {"metric": "mIoU"}}, "register.metric: Input should be 'miou'"),
    ({"register": {"model_name": "seg'flow"}}, "register.model_name: String should match pattern"),
    ({"split": {"group_by": "(unclosed"}}, "split.group_by: not a regular expression"),
    ({"train": {"archs": ["unet", "deeplabv3_plus"]}}, r"train.archs: unknown architecture 'deeplabv3_plus'; available: "),
    ({"teacher": {"arch": "Unet"}}, "teacher.arch: unknown architecture 'Unet'"),
    ({"models": {"fcn": {"width": 0.5}}}, "models: unknown architecture 'fcn'"),
])
def test_values_that_crashed_a_later_stage_are_refused_naming_the_key(raw, message):
    with pytest.raises(SegflowError, match=message):
        parse_params(raw)


def test_true_and_false_stay_valid_where_the_key_takes_them():
    params = parse_params({"train": {"use_pseudo_labels": True, "augment": {"hflip": False}}})
    assert params.train.use_pseudo_labels is True and params.train.augment.hflip is False
