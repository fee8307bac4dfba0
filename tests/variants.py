"""Which variants a test runs on: the default run (`make test`) takes each family's smallest and largest,
`make test-all` every variant (the others are marked slow)."""
import pytest


def matrix(names: list[str], default: tuple[str, ...]) -> list:
    return [pytest.param(n, marks=() if n in default else pytest.mark.slow) for n in names]


LEVIT = matrix(["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"], ("levit_128s", "levit_384"))
