"""Starting weights from a trained model: a warm start, or a student fine-tuning its teacher."""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from segflow import WEIGHTS_FILE
from segflow.errors import SegflowError
from segflow.inference.card import read_card

log = logging.getLogger(__name__)


def load_initial_weights(network: nn.Module, arch: str, classes: list[str], model_dir: Path) -> list[str]:
    """Start from a trained model's weights (a warm start, or a self-training student fine-tuning its teacher).

    The architecture must be the same, and every tensor must fit, except the class-sized ones of the head when
    the classes differ: those keep their fresh initialisation, and their names are returned."""
    card = read_card(model_dir)
    if card.arch != arch:
        raise SegflowError(f"{model_dir}: cannot start {arch} from this {card.arch} model; train.init_from must be "
                           f"a model of the same architecture.")
    if card.classes != classes and card.num_classes == len(classes):
        raise SegflowError(f"{model_dir}: its classes {card.classes} are not these {classes}, yet as many: its head "
                           "cannot be told from the rest; give a model of these classes, or none.")
    try:
        state, own = load_file(str(Path(model_dir) / WEIGHTS_FILE)), network.state_dict()
    except (SafetensorError, OSError) as exc:
        raise SegflowError(f"{model_dir}: cannot read its weights ({exc}).") from None

    def head_of_other_classes(key: str) -> bool:  # the class dimension(s) alone differ
        old, new = tuple(state[key].shape), tuple(own[key].shape)
        return len(old) == len(new) and old != new and all(
            a == b or (a, b) == (card.num_classes, len(classes)) for a, b in zip(old, new))

    mismatched = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    reinitialised = [k for k in mismatched if head_of_other_classes(k)]
    problems = {"missing": sorted(own.keys() - state.keys()), "unexpected": sorted(state.keys() - own.keys()),
                "of another shape": [k for k in mismatched if k not in reinitialised]}
    if any(problems.values()):
        listed = "; ".join(f"{label}: {', '.join(keys[:5])}{' and more' if len(keys) > 5 else ''}"
                           for label, keys in problems.items() if keys)
        raise SegflowError(f"{model_dir}: its weights do not fit {arch} with the options of params.yaml's "
                           f"models.{arch} ({listed}); the options must be the model's: {card.options}.")
    network.load_state_dict({**state, **{k: own[k] for k in reinitialised}})
    if reinitialised:
        log.info("%s: started from %s; its %d classes are not these %d, so the head starts afresh: %s", arch,
                 model_dir, card.num_classes, len(classes), ", ".join(reinitialised))
    return reinitialised
