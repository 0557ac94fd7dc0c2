"""A network's input normalisation (a manifest's ``normalization``): applied to tiles, and described in outputs.

Training (training/augment.py, training/mil.py) and the runtime call the same ``normalize``, so a
network sees in service what it saw in training.
"""

from __future__ import annotations

import numpy as np

from glio_node.manifest import NORMALIZATIONS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization_description(normalization: str) -> str:
    """A manifest ``normalization`` in words, with its reference: what outputs record was applied."""
    from glio_node.pipeline import stain  # noqa: PLC0415 - pipeline imports bundle

    if normalization == "scale_0_1":
        return "no stain normalisation (RGB / 255)"
    if normalization == "imagenet":
        return f"no stain normalisation (RGB / 255; ImageNet mean {IMAGENET_MEAN} std {IMAGENET_STD})"
    if normalization == "reinhard":
        return f"Reinhard to the lab reference mean {stain.REFERENCE_MEAN} std {stain.REFERENCE_STD}"
    if normalization == "macenko":
        return (
            f"Macenko to the reference H&E stain matrix {stain.REFERENCE_STAIN_MATRIX} "
            f"max concentrations {stain.REFERENCE_MAX_C}"
        )
    raise ValueError(f"normalization {normalization!r} is unknown; allowed: {', '.join(NORMALIZATIONS)}")



def normalize(tiles: np.ndarray, normalization: str) -> np.ndarray:
    """RGB uint8 tiles (..., 3) -> float32 network input, as a manifest's ``normalization`` says.

    - ``scale_0_1``: x / 255;
    - ``imagenet``: (x / 255 - mean) / std with the ImageNet RGB mean and standard deviation;
    - ``reinhard``: Reinhard stain normalisation to glio_node.pipeline.stain's reference, then x / 255;
    - ``macenko``: Macenko stain normalisation to glio_node.pipeline.stain's reference H&E stain
      vectors and concentrations, then x / 255.
    """
    if normalization in ("reinhard", "macenko"):
        from glio_node.pipeline.stain import macenko, reinhard  # noqa: PLC0415 - pipeline imports bundle

        tiles = reinhard(tiles) if normalization == "reinhard" else macenko(tiles)
    x = np.asarray(tiles, dtype=np.float32) / np.float32(255.0)
    if normalization in ("scale_0_1", "reinhard", "macenko"):
        return x
    if normalization == "imagenet":
        return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    raise ValueError(f"normalization {normalization!r} is unknown; allowed: {', '.join(NORMALIZATIONS)}")

