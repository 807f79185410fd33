"""The bundled synthetic concepts as default training data, and their metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

GROUP_OF_METHOD = {
    "textual_inversion": "textual_inversion",
    "custom_diffusion": "custom_diffusion",
    "dreambooth": "dreambooth",
    "dreambooth_lora": "dreambooth",
}


def bundled_concept(method: str) -> Any:
    """The first bundled concept of the method's group (the paper's split: 9 TI / 9 CD / 30 DB)."""
    from dvar_lab.world import list_concepts

    return list_concepts(GROUP_OF_METHOD[method])[0]


def concept_metadata(folder: Optional[str]) -> Optional[Dict[str, Any]]:
    """``<name>.json`` beside a bundled-format concept folder ``<name>/``, or None for a plain folder of photos."""
    if folder is None:
        return None
    from dvar_lab.world.concepts import metadata_path

    path = metadata_path(Path(folder).resolve())
    if not path.is_file():
        return None
    with open(path) as handle:
        meta = json.load(handle)
    return meta if meta.get("name") == path.stem else None  # some other JSON file that happens to lie there


def concept_class_word(folder: Optional[str]) -> Optional[str]:
    """The class noun of a bundled-format concept folder ("dog"), or None for a plain folder."""
    meta = concept_metadata(folder)
    return None if meta is None else meta.get("class_word")


def concept_prompts(folder: Optional[str]) -> Optional[List[str]]:
    """Training prompt templates (with ``{}`` for the concept) when the folder gives them."""
    meta = concept_metadata(folder)
    return None if meta is None else list(meta.get("train_prompts") or []) or None
