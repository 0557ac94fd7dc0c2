"""Coded concepts for every class a glio-node network outputs (see docs/coding.md).

SNOMED CT ("SCT") is used only where the concept is certain; everything else is coded in the local
scheme ``99GLIO`` documented in docs/coding.md.  Writers (SEG segment categories, SR findings) and
the training pipeline (label order) both take their class lists from here, so the label value a
network emits and the concept a DICOM object carries cannot drift apart.

Orders are fixed: ``REGION_CLASSES[i]`` is label value ``i`` of the segmentation head and follows
``glio_node.synthetic.textures.REGION_CLASSES``; ``SUBTYPE_CLASSES`` follows ``textures.SUBTYPES``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from glio_node.results import CodedClass

LOCAL_SCHEME = "99GLIO"
"""Coding Scheme Designator of the local glio-node scheme (private schemes start with "99")."""
LOCAL_SCHEME_NAME = "glio-node local codes"
LOCAL_SCHEME_VERSION = "1"
SNOMED_CT = "SCT"


def _local(code_value: str, name: str, code_meaning: str) -> CodedClass:
    return CodedClass(name, code_value, LOCAL_SCHEME, code_meaning)


# Ivy GAP anatomic features (Puchalski et al., Science 2018), plus "other" for everything else.
REGION_CLASSES: tuple[CodedClass, ...] = (
    _local("GLIO-R01", "other", "Other tissue"),
    _local("GLIO-R02", "leading_edge", "Leading edge"),
    _local("GLIO-R03", "infiltrating_tumor", "Infiltrating tumor"),
    _local("GLIO-R04", "cellular_tumor", "Cellular tumor"),
    CodedClass("necrosis", "6574001", SNOMED_CT, "Necrosis"),  # GLIO-R05 is reserved, never used
    _local("GLIO-R06", "pseudopalisading_cells_around_necrosis", "Pseudopalisading cells around necrosis"),
    _local("GLIO-R07", "pseudopalisading_cells_no_visible_necrosis", "Pseudopalisading cells, no visible necrosis"),
    _local("GLIO-R08", "perinecrotic_zone", "Perinecrotic zone"),
    _local("GLIO-R09", "microvascular_proliferation", "Microvascular proliferation"),
    _local("GLIO-R10", "hyperplastic_blood_vessels", "Hyperplastic blood vessels"),
)

# Transcriptional subtypes of glioblastoma (Verhaak et al., Cancer Cell 2010).
SUBTYPE_CLASSES: tuple[CodedClass, ...] = (
    _local("GLIO-S01", "classical", "Classical subtype"),
    _local("GLIO-S02", "mesenchymal", "Mesenchymal subtype"),
    _local("GLIO-S03", "neural", "Neural subtype"),
    _local("GLIO-S04", "proneural", "Proneural subtype"),
)

MGMT_CLASSES: tuple[CodedClass, ...] = (
    _local("GLIO-M01", "methylated", "MGMT promoter methylated"),
    _local("GLIO-M02", "unmethylated", "MGMT promoter unmethylated"),
)

EGFR_CLASSES: tuple[CodedClass, ...] = (
    _local("GLIO-E01", "amplified", "EGFR amplified"),
    _local("GLIO-E02", "not_amplified", "EGFR not amplified"),
)

CLASSES_BY_TASK: Mapping[str, tuple[CodedClass, ...]] = MappingProxyType(
    {
        "segmentation": REGION_CLASSES,
        "subtype": SUBTYPE_CLASSES,
        "mgmt": MGMT_CLASSES,
        "egfr": EGFR_CLASSES,
    }
)
"""The demo bundle's classes per head task, in output order."""

# Display colours (sRGB 0..255) of the region classes, by class name: the SEG's Recommended
# Display CIELab Value, the ANN groups' and the GeoJSON classifications' colour, so a class looks
# the same in Slim and in QuPath.  Loosely after the Ivy GAP atlas's legend (cellular tumour
# green, infiltrating tumour purple, necrosis near-black, vessels red); docs/coding.md lists them.
REGION_DISPLAY_RGB: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "other": (160, 160, 160),
        "leading_edge": (33, 143, 166),
        "infiltrating_tumor": (210, 5, 208),
        "cellular_tumor": (5, 208, 4),
        "necrosis": (40, 40, 40),
        "pseudopalisading_cells_around_necrosis": (255, 102, 0),
        "pseudopalisading_cells_no_visible_necrosis": (6, 208, 170),
        "perinecrotic_zone": (37, 209, 247),
        "microvascular_proliferation": (255, 0, 0),
        "hyperplastic_blood_vessels": (255, 255, 0),
    }
)
TISSUE_DISPLAY_RGB: tuple[int, int, int] = (0, 0, 255)
"""The tissue outline's colour (GeoJSON), apart from every region class."""
FALLBACK_DISPLAY_RGB: tuple[int, int, int] = (128, 128, 128)
"""A class without an entry in REGION_DISPLAY_RGB (a future bundle's) is drawn grey."""


def display_rgb(c: CodedClass) -> tuple[int, int, int]:
    """The display colour of a region class (see REGION_DISPLAY_RGB)."""
    return REGION_DISPLAY_RGB.get(c.name, FALLBACK_DISPLAY_RGB)


# Two-stage (attention-MIL) slide calls, docs/coding.md "Aggregator heads".
ATTENTION_WEIGHT = _local("ATTNWEIGHT", "attention_weight", "Attention weight")
"""Quantity of an attention Parametric Map: a tile's softmax attention weight in its slide's bag."""
FOLD_SPREAD = _local("FOLDSPREAD", "fold_spread", "Fold model spread of top-class probability")
"""max - min across fold models of the probability each gives the ensemble's top class (unit 1)."""
INDETERMINATE_REASON = _local("INDETREASON", "indeterminate_reason", "Reason the call is indeterminate")
LOW_PROBABILITY = _local("LOWPROB", "low_probability", "Top probability below the decision threshold")
FOLD_DISAGREEMENT = _local("FOLDDISAGREE", "fold_disagreement", "Fold models disagree beyond the limit")
INDETERMINATE_REASONS: Mapping[str, CodedClass] = MappingProxyType(
    {"low_probability": LOW_PROBABILITY, "fold_disagreement": FOLD_DISAGREEMENT}
)
