"""Model specs the monitoring tests judge: a classifier and a regressor on the outcomes labels."""

import pytest

from keel.models.spec import ModelSpec


@pytest.fixture
def churn(buyer, outcomes) -> ModelSpec:
    return ModelSpec(name="churn", entity=buyer, features=("spend",), labels=outcomes, label="churned")


@pytest.fixture
def spend(buyer, outcomes) -> ModelSpec:
    return ModelSpec(
        name="spend",
        entity=buyer,
        features=("spend",),
        labels=outcomes,
        label="spend_next",
        task="regression",
        metric="rmse",
    )
