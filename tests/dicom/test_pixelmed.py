"""PixelMed's DicomSRValidator (the validator IHE Connectathons use for Evidence Creators) on the SRs
the node makes: lateral only, obliques only, mixed, superseding, an engine not validated, a demo
engine, and the golden sample. Zero errors; every warning must be one that deploy/CONFORMANCE.md
explains (PIXELMED_EXPLAINED_WARNINGS).

Needs Java and PixelMed (Debian: libpixelmed-java / pixelmed-apps with default-jre-headless;
.ci/run installs them); skips with a message otherwise. All SRs go through one JVM when the Java
installation can run a single-file source program (a JDK); with a bare JRE, one JVM per SR.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from screener.dicom import samples
from screener.dicom.sr import SRReference, build_sr, sr_to_bytes

ROOT = Path(__file__).resolve().parents[2]
# Debian's JDK 17: the validator's XSLT exceeds the JDK's default XPath operator limits.
JAVA_OPTS = ["-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0"]
VALIDATOR = "com.pixelmed.validate.DicomSRValidator"

# Warnings that are explained in deploy/CONFORMANCE.md ("PixelMed DicomSRValidator" section).
PIXELMED_EXPLAINED_WARNINGS = (
    # TID 4019 Algorithm Manufacturer: newer than the template tables of PixelMed's 2022 build.
    re.compile(r'TEXT \(122405,DCM,"Algorithm Manufacturer"\): Content Item not in template$'),
    # The group's qualitative evaluation (finding code = Present/Absent), written by highdicom's
    # QualitativeEvaluation: not a row of TID 1501/1410 in PixelMed's 2022 template tables.
    re.compile(r'CODE \(CSP\d{3},99CSPINE,"[^"]+"\): Content Item not in template$'),
)

LAUNCHER = """
import com.pixelmed.validate.DicomSRValidator;

public class ValidateMany {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String path : args) {
            System.out.println("=== FILE " + path);
            try {
                System.out.println(validator.validate(path));
            } catch (Exception e) {
                System.out.println("Error: " + e);
            }
        }
    }
}
"""


def pixelmed_jar() -> Path | None:
    env = os.environ.get("PIXELMED_JAR")
    candidates = [Path(env)] if env else []
    candidates += [Path("/usr/share/java/pixelmed.jar"), *sorted(Path("/usr/share/java").glob("pixelmed*.jar"))]
    return next((c for c in candidates if c.is_file()), None)


JAR = pixelmed_jar()
needs_pixelmed = pytest.mark.skipif(
    JAR is None or shutil.which("java") is None,
    reason="needs Java and PixelMed (apt-get install libpixelmed-java pixelmed-apps default-jre-headless)",
)


def _split(output: str) -> dict[str, str]:
    out: dict[str, str] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("=== FILE "):
            current = line[len("=== FILE ") :].strip()
            out[current] = ""
        elif current is not None:
            out[current] += line + "\n"
    return out


def validate(paths: list[Path], workdir: Path) -> dict[str, str]:
    """PixelMed's report per file (one JVM if possible)."""
    assert JAR is not None
    src = workdir / "ValidateMany.java"
    src.write_text(LAUNCHER)
    cmd = ["java", *JAVA_OPTS, "-cp", str(JAR), str(src), *map(str, paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    reports = _split(proc.stdout)
    if proc.returncode == 0 and set(reports) == {str(p) for p in paths}:
        return reports
    # A JRE without the compiler module cannot launch a source file: one JVM per SR.
    reports = {}
    for p in paths:
        one = subprocess.run(
            ["java", *JAVA_OPTS, "-cp", str(JAR), VALIDATOR, str(p)], capture_output=True, text=True, timeout=300
        )
        reports[str(p)] = one.stdout + one.stderr
    return reports


def problems(report: str) -> list[str]:
    """Errors, unexplained warnings, and a missing template check."""
    bad = []
    if "Found Root Template TID_1500" not in report:
        bad.append("root template TID 1500 not found")
    for line in report.splitlines():
        if line.startswith("Error"):
            bad.append(line)
        elif line.startswith("Warning") and not any(rx.search(line) for rx in PIXELMED_EXPLAINED_WARNINGS):
            bad.append(line)
    return bad


def test_problems_flags_errors_and_unexplained_warnings():
    ok = "Found Root Template TID_1500 (MeasurementReport)\n" + (
        'Warning: 1.8.1.7: /CONTAINER (125007,DCM,"Measurement Group")/TEXT (122405,DCM,"Algorithm Manufacturer"): '
        "Content Item not in template\n"
    )
    assert problems(ok) == []
    assert problems(ok + "Error: 1.2: something\n") == ["Error: 1.2: something"]
    assert len(problems(ok + "Warning: 1.3: Content Item not in template\n")) == 1
    assert problems("") == ["root template TID 1500 not found"]


def node_srs(out: Path) -> list[Path]:
    """The SRs the node makes for the cases the issue lists, written under `out`."""
    images = samples.sample_images()
    unvalidated = samples.sample_findings(images, samples.sample_engines(validated=False))
    validated = samples.sample_findings(images, samples.sample_engines(validated=True))
    demo = samples.sample_findings(images, samples.sample_engines(validated=False, demo=True))
    mixed = samples.build_sample_sr(unvalidated)
    late = replace(unvalidated[0], source=replace_uid(unvalidated[0].source, "late"))
    prior = SRReference(
        str(mixed.StudyInstanceUID), str(mixed.SeriesInstanceUID), str(mixed.SOPClassUID), str(mixed.SOPInstanceUID)
    )
    cases = {
        "lateral-only": samples.build_sample_sr(validated[:1]),
        "obliques-only": samples.build_sample_sr(unvalidated[1:]),
        "mixed": mixed,
        "superseding": samples.build_sample_sr(unvalidated + [late], predecessors=[prior], instance_number=2),
        "one-engine-not-validated": samples.build_sample_sr(validated[:1] + unvalidated[1:]),
        "demo-engine": samples.build_sample_sr(demo),
    }
    paths = []
    for name, sr in cases.items():
        path = out / f"{name}.dcm"
        path.write_bytes(sr_to_bytes(sr))
        paths.append(path)
    return paths


def replace_uid(header, tag: str):
    from screener.dicom.sr import derive_uid

    h = copy.deepcopy(header)
    h.SOPInstanceUID = derive_uid("cspine-screener sample", "image", tag)
    h.InstanceNumber = 2
    return h


def test_the_cases_have_the_expected_flags(tmp_path):
    import pydicom

    flags = {p.stem: pydicom.dcmread(p) for p in node_srs(tmp_path)}
    assert flags["lateral-only"].PreliminaryFlag == "FINAL"
    for name in ("obliques-only", "mixed", "superseding", "one-engine-not-validated", "demo-engine"):
        assert flags[name].PreliminaryFlag == "PRELIMINARY", name
    assert all(ds.VerificationFlag == "UNVERIFIED" for ds in flags.values())
    assert "PredecessorDocumentsSequence" in flags["superseding"]
    assert build_sr  # the node's builder is what samples.build_sample_sr calls


@needs_pixelmed
def test_pixelmed_reports_no_errors_on_the_node_srs(tmp_path):
    paths = node_srs(tmp_path)
    sample = ROOT / "docs" / "samples" / "sr.dcm"
    if sample.is_file():
        paths.append(sample)
    reports = validate(paths, tmp_path)
    failures = {Path(p).name: problems(r) for p, r in reports.items() if problems(r)}
    assert not failures, "\n".join(f"{name}:\n  " + "\n  ".join(lines) for name, lines in failures.items())
    assert set(reports) == {str(p) for p in paths}


def test_the_superseding_case_adds_a_distinct_image(tmp_path):
    import pydicom

    from screener.dicom.sr import summarize

    paths = {p.stem: p for p in node_srs(tmp_path)}
    mixed = {r["source_sop_instance_uid"] for r in summarize(pydicom.dcmread(paths["mixed"]))}
    later = [r["source_sop_instance_uid"] for r in summarize(pydicom.dcmread(paths["superseding"]))]
    assert len(later) == 4 and set(later[:3]) == mixed and later[3] not in mixed
