from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--torture",
        action="store_true",
        default=False,
        help="run the long torture versions (100k fuzz mutations, 1,000+ kill loops)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--torture"):
        return
    skip = pytest.mark.skip(reason="long torture run: pass --torture")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torture(request: pytest.FixtureRequest) -> bool:
    """True under --torture: tests scale their iteration counts up with it."""
    return bool(request.config.getoption("--torture"))
