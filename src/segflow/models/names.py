"""Every architecture name and the ``segflow.models`` family module that builds it.

Known without importing torch or SMP: parameters naming an architecture that does not exist are refused when
``params.yaml`` loads (not after the teacher has trained), and building a model imports only its family's module
(SMP, the slowest import, only for SMP's architectures). tests/models/test_registry.py checks this table against
what the family modules register.
"""

FAMILY_MODULES = {
    "deconvnet": "deconvnet",
    "deeplabv1_largefov": "deeplabv1",
    "deeplabv2": "deeplabv2",
    "deeplabv3": "smp",
    "deeplabv3plus": "smp",
    "dilatednet": "dilatednet",
    "fcdensenet56": "fcdensenet",
    "fcdensenet67": "fcdensenet",
    "fcdensenet103": "fcdensenet",
    "fcn32s": "fcn",
    "fcn16s": "fcn",
    "fcn8s": "fcn",
    "fcn_resnet50": "fcn",
    "fpn": "smp",
    "linknet": "smp",
    "manet": "smp",
    "pan": "smp",
    "pspnet": "pspnet",
    "segformer": "smp",
    "segnet": "segnet",
    "segnet_basic": "segnet",
    "unet": "smp",
    "unet_original": "unet_original",
    "unetplusplus": "smp",
    "upernet": "smp",
}
ARCHITECTURES = sorted(FAMILY_MODULES)


def unknown_architecture(name: str) -> str | None:
    """Why ``name`` is no architecture (naming the available ones), or None when it is one."""
    if name in FAMILY_MODULES:
        return None
    return f"unknown architecture {name!r}; available: {', '.join(ARCHITECTURES)}"
