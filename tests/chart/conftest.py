"""Fixtures for the chart tests: one scenario (a value set) per parameter, rendered once."""

from __future__ import annotations

import pytest
from helmchart import SCENARIOS, Obj, render


@pytest.fixture(params=list(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rendered(scenario: str) -> list[Obj]:
    return render(scenario)
