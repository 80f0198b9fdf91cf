"""Java Avro as an independent decoder: jars from Maven Central, a program compiled with javac.

``tests/java/pom.xml`` resolves ``org.apache.avro:avro`` into the cache directory once (like the
Kafka jars of the local stack); ``tests/java/AvroDecode.java`` is compiled at test time and
decodes single-object messages with ``BinaryMessageDecoder``. A missing JDK or Maven fails the
test with one line saying what to do (never a skip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

AVRO_VERSION = "1.12.1"
REPO = Path(__file__).resolve().parents[2]
JAVA_DIR = REPO / "tests" / "java"
AVSC_DIR = REPO / "schemas" / "avro"
# Parse order: WorkflowReceipt refers to StepReceipt.
AVSC_FILES = (
    "step_receipt.avsc",
    "step_outcome.avsc",
    "run_completion.avsc",
    "workflow_receipt.avsc",
)


def _cache_dir() -> Path:
    return Path(os.environ.get("CHIO_CACHE_DIR", REPO / ".cache"))


def _jdk_tool(name: str) -> str:
    home = os.environ.get("JAVA_HOME")
    tool = str(Path(home) / "bin" / name) if home else shutil.which(name)
    if not tool or not Path(tool).exists():
        pytest.fail(
            f"{name} not found: install a JDK 17+ (Debian: `apt-get install "
            "openjdk-17-jdk-headless`) or set JAVA_HOME to one",
            pytrace=False,
        )
    return tool


def avro_jars() -> Path:
    """The directory of Java Avro's jars, resolved by Maven into the cache once."""
    libs = _cache_dir() / f"avro-{AVRO_VERSION}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        pytest.fail(
            "mvn not found and the Java Avro jars are not cached yet: install Maven "
            "(Debian: `apt-get install maven`); it fetches them from Maven Central once",
            pytrace=False,
        )
    libs.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(JAVA_DIR / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
            f"-Davro.version={AVRO_VERSION}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0 or not (libs / f"avro-{AVRO_VERSION}.jar").exists():
        last = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        pytest.fail(
            f"Maven could not resolve org.apache.avro:avro:{AVRO_VERSION} (check that Maven "
            f"Central is reachable): {last[0]}",
            pytrace=False,
        )
    marker.write_text(AVRO_VERSION)
    return libs


@dataclass(frozen=True)
class JavaResult:
    """What AvroDecode printed: per schema its fingerprint and canonical form, then one result
    per message (``{"ok": true, "record": ...}`` or ``{"ok": false, "error": ...}``)."""

    fingerprints: dict[str, str]
    canonical: dict[str, str]
    results: list[dict[str, Any]]


def java_decode(messages: list[tuple[str, bytes]], workdir: Path) -> JavaResult:
    """Decode ``(schema full name, framed value)`` pairs with Java Avro's BinaryMessageDecoder,
    reading the project's ``.avsc`` files (StepReceipt, RunCompletion, WorkflowReceipt)."""
    javac, java = _jdk_tool("javac"), _jdk_tool("java")
    libs = avro_jars()
    classes = workdir / "classes"
    classes.mkdir(parents=True, exist_ok=True)
    classpath = f"{libs}/*"
    compiled = subprocess.run(
        [javac, "-cp", classpath, "-d", str(classes), str(JAVA_DIR / "AvroDecode.java")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert compiled.returncode == 0, f"javac failed:\n{compiled.stderr}"
    listing = workdir / "messages.txt"
    listing.write_text("".join(f"{name} {value.hex()}\n" for name, value in messages))
    avsc = [str(AVSC_DIR / f) for f in AVSC_FILES]
    ran = subprocess.run(
        [java, "-cp", f"{classes}{os.pathsep}{classpath}", "AvroDecode", str(listing), *avsc],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, f"AvroDecode failed:\n{ran.stderr}"
    lines = [json.loads(line) for line in ran.stdout.splitlines() if line.strip()]
    heads, results = lines[: len(AVSC_FILES)], lines[len(AVSC_FILES) :]
    assert len(results) == len(messages), ran.stdout[-2000:]
    return JavaResult(
        fingerprints={h["schema"]: h["fingerprint"] for h in heads},
        canonical={h["schema"]: h["canonical"] for h in heads},
        results=results,
    )
