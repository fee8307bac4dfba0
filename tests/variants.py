"""Which variants a test runs on. The default run (`make test`) takes each family's smallest variant for
loading, the independent implementation and fusion, and LeViT-128S alone for most exports (the export code
does not depend on the variant; the largest variants cost 20-60 s per test on 2 cores, and the suite is held
under 8 minutes); `make test-all` runs every variant everywhere (the rest are marked slow)."""
import pytest

LEVIT_NAMES = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]
LIGHTVIT_NAMES = ["lightvit_tiny", "lightvit_small", "lightvit_base"]
LITV2_NAMES = ["litv2_s", "litv2_m", "litv2_b"]


def matrix(names: list[str], default: tuple[str, ...]) -> list:
    return [pytest.param(n, marks=() if n in default else pytest.mark.slow) for n in names]


LEVIT = matrix(LEVIT_NAMES, (LEVIT_NAMES[0],))
LIGHTVIT = matrix(LIGHTVIT_NAMES, (LIGHTVIT_NAMES[0],))
LITV2 = matrix(LITV2_NAMES, (LITV2_NAMES[0],))
#: each family's smallest, only LeViT-128S in the default run: for targets whose conversion is generic (OpenVINO,
#: Core ML, ExecuTorch) the other families cost 10-30 s each and run in `make test-all`
SMALLEST_LEVIT_FIRST = matrix([LEVIT_NAMES[0], LIGHTVIT_NAMES[0], LITV2_NAMES[0]], (LEVIT_NAMES[0],))
