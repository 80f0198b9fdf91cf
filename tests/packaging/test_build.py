"""Building the wheel prints no warning, and its metadata says what the package is: an SPDX
license expression with the license text shipped, and extras named for what they add."""

from __future__ import annotations

import re
import zipfile
from email.parser import Parser

import pytest

from tests.packaging.conftest import Built

pytestmark = pytest.mark.integration

# Lines naming files the build copies or writes (a file name may contain "warning").
_FILE_LINE = re.compile(r"^\s*(copying|adding|creating|writing|reading|changing mode) ")
EXTRAS = {"otel", "test", "lint", "fuzz", "bench", "dev"}


def test_the_build_prints_no_warning(built: Built) -> None:
    lines = [ln for ln in built.log.splitlines() if not _FILE_LINE.match(ln)]
    assert any("Successfully built chio-receipts" in ln for ln in lines)
    flagged = [ln for ln in lines if re.search(r"warn|deprecat|!!", ln, re.IGNORECASE)]
    assert flagged == []


def test_the_metadata_has_an_spdx_license_and_named_extras(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as wheel:
        (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(wheel.read(meta).decode("utf-8"))
        names = wheel.namelist()
    # License-Expression and License-File are metadata 2.4 (PEP 639).
    version = tuple(int(part) for part in metadata["Metadata-Version"].split("."))
    assert version >= (2, 4)
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["License"] is None  # the expression alone, no legacy free-text field
    assert not [c for c in metadata.get_all("Classifier") or [] if c.startswith("License ::")]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert set(metadata.get_all("Provides-Extra") or []) == EXTRAS
    requires = metadata.get_all("Requires-Dist") or []
    dev = [r for r in requires if r.endswith('extra == "dev"')]
    assert dev == ['chio-receipts[bench,fuzz,lint,otel,test]; extra == "dev"']
