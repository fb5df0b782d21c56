"""Which model to load when the user names none.

The released 7B beacon model is what real use wants; on a machine that has it cached or can fetch
it, that is the default. A fresh offline machine has neither, and the first run should still do the
real job end to end, so it falls back to the small demo beacon model shipped inside the package
(trained by `scripts/train_demo_base.py` and `scripts/train_demo_beacon.py`; see its model card).
A model the user names explicitly never falls back: a typo must not silently load a toy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .beacon.checkpoint import CheckpointError, resolve_model_dir

logger = logging.getLogger(__name__)

RELEASED_MODEL = "namespace-Pt/beacon-qwen-2-7b-instruct"
DEMO_MODEL_DIR = Path(__file__).parent / "models" / "beacon-demo-python-12m"
MODEL_ENV = "BEACON_APPS_MODEL"
DEMO_ALIAS = "demo"  # `--model demo`: the bundled model, whatever the network says
MODEL_HELP = (  # the --model option of every command line (CLI, app)
    "hub id or local folder of a beacon checkpoint (default: $BEACON_APPS_MODEL, else the "
    "released 7B model, else offline the bundled demo model, which `demo` names)"
)


def resolve_alias(model: str | os.PathLike) -> str | os.PathLike:
    """`demo` names the bundled demo model (unless a folder called `demo` is right here)."""
    if str(model) == DEMO_ALIAS and not Path(DEMO_ALIAS).is_dir():
        return DEMO_MODEL_DIR
    return model


def default_model() -> str | Path:
    """$BEACON_APPS_MODEL if set, else the released model's local folder (cached or fetched now),
    else the bundled demo model, with a warning that says what it can and cannot do."""
    named = os.environ.get(MODEL_ENV)
    if named:
        return resolve_alias(named)
    try:
        resolve_model_dir(RELEASED_MODEL)  # cached, or fetched now
        return RELEASED_MODEL
    except CheckpointError as error:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise
        logger.warning(
            "%s is not cached here and cannot be fetched (%s). Using the bundled demo model "
            "%s: 12M parameters trained on Python code, it finds facts such as pass keys in "
            "long documents and little else. Real use wants the released model: download it "
            "where there is network (huggingface-cli download %s) and pass its folder with "
            "--model (or set $%s).",
            RELEASED_MODEL,
            str(error).split("(", 1)[-1].split(")", 1)[0],
            DEMO_MODEL_DIR.name,
            RELEASED_MODEL,
            MODEL_ENV,
        )
        return DEMO_MODEL_DIR
