"""Run dicom3tools' dciodvfy on a file; fail on anything the standard does not permit.

``ALLOW_LIST`` holds the only dciodvfy messages tests accept, each with the part of the standard
that permits what dciodvfy flags and the condition under which it applies. Every other error or
warning fails ``assert_valid``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from peers import require

DCIODVFY = shutil.which("dciodvfy")


@dataclass(frozen=True)
class Allowed:
    """A dciodvfy message the standard permits, and when."""

    pattern: str  # regular expression over one whole output line
    section: str  # where the standard permits it
    reason: str
    applies: Callable[[pydicom.Dataset], bool] = lambda ds: True


ALLOW_LIST: tuple[Allowed, ...] = (
    Allowed(
        pattern=(
            r"Warning - Unrecognized defined term <99[A-Z0-9_]+> for value 1 of attribute "
            r"<Coding Scheme Designator>"
        ),
        section="PS3.16 Section 8 (Coding Scheme Designators beginning with '99' are local)",
        reason="local codes of glio-node's 99GLIO scheme, declared in CodingSchemeIdentificationSequence",
        applies=lambda ds: any(
            str(item.CodingSchemeDesignator).startswith("99")
            for item in ds.get("CodingSchemeIdentificationSequence", [])
        ),
    ),
    Allowed(
        pattern=(
            r"Warning - Unrecognized defined term <QUANTITY> for value 4 of attribute "
            r"<(Image|Frame) Type>"
        ),
        section="PS3.3 C.8.32.2 (Parametric Map Image Type value 4: Defined Terms, extensible)",
        reason=(
            "value 4 (Derived Pixel Contrast) takes Defined Terms, which unlike Enumerated "
            "Values may be extended; QUANTITY (a map of a measured quantity) is highdicom's "
            "default for Parametric Maps and unknown to dicom3tools (2022)"
        ),
        applies=lambda ds: ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30",
    ),
    Allowed(
        pattern=r"Error - Missing attribute Type 2C Conditional Element=<Laterality> Module=<GeneralSeries>",
        section="PS3.3 C.7.3.1 (General Series, Laterality (0020,0060) condition)",
        reason=(
            "Laterality is required only if the body part examined is a paired structure; a "
            "slide without Body Part Examined and without a Specimen module names none"
        ),
        applies=lambda ds: "BodyPartExamined" not in ds and "SpecimenDescriptionSequence" not in ds,
    ),
    Allowed(
        pattern=(
            r"Warning - Missing attribute or value that would be needed to build DICOMDIR - "
            r"(Patient ID|Study Date|Study Time|Study ID)"
        ),
        section="PS3.5 7.4 (Type 2 attributes may be zero length); PS3.3 F.5 applies to media only",
        reason=(
            "Patient ID, Study Date, Study Time and Study ID are Type 2: present but empty when "
            "the slide had no value (wsidicomizer leaves them empty). The outputs copy the "
            "slide's patient and study modules and never invent identifiers; the warning is "
            "about building a DICOMDIR for media, which glio-node does not write"
        ),
        applies=lambda ds: any(
            not str(ds.get(k, "")) for k in ("PatientID", "StudyDate", "StudyTime", "StudyID")
        ),
    ),
)


@dataclass
class Report:
    """dciodvfy's verdict on one file."""

    path: Path
    iod: str
    errors: list[str] = field(default_factory=list)  # not allowed
    warnings: list[str] = field(default_factory=list)  # not allowed
    allowed: list[tuple[str, str]] = field(default_factory=list)  # (line, section)


def run_dciodvfy(path: Path) -> Report:
    """Run dciodvfy on ``path`` and sort its messages; without dciodvfy, ``peers.require`` stops
    the test (a failure under CI, a skip elsewhere)."""
    done = subprocess.run([require("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    report = Report(path=Path(path), iod=lines[0] if lines else "")
    for line in lines:
        if not line.startswith(("Error", "Warning")):
            continue
        rule = next(
            (a for a in ALLOW_LIST if re.fullmatch(a.pattern, line) and a.applies(dataset)), None
        )
        if rule is not None:
            report.allowed.append((line, rule.section))
        elif line.startswith("Error"):
            report.errors.append(line)
        else:
            report.warnings.append(line)
    return report


def assert_valid(path: Path) -> Report:
    """Fail unless dciodvfy reports nothing beyond ``ALLOW_LIST``; return the report."""
    report = run_dciodvfy(path)
    problems = report.errors + report.warnings
    assert not problems, f"dciodvfy on {Path(path).name} ({report.iod}):\n" + "\n".join(problems)
    return report
