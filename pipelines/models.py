"""Models of the shop: who is about to churn, from what they buy, how they browse and who they are."""

from keel.models.spec import ModelSpec, Split
from pipelines.entities import user
from pipelines.sources import churn_labels

churn = ModelSpec(
    name="churn",
    entity=user,
    features=(
        "user_transactions",
        "user_clicks",
        "user_engagement",
        "user_profile.plan",
        "user_profile.age",
        "user_profile.country",
        "user_profile.signup_device",
    ),
    labels=churn_labels,
    label="churned",
    algorithm="xgboost",
    # Small and regularised: a few thousand weekly label rows per quarter of demo data.
    params={
        "n_estimators": 200,
        "max_depth": 4,
        "learning_rate": 0.05,
        "subsample": 0.8,
        "colsample_bytree": 0.8,
        "min_child_weight": 5,
        # One thread: the served booster answers one request per worker (see STYLE.md).
        "n_jobs": 1,
    },
    task="classification",
    metric="roc_auc",
    split=Split(holdout="14d"),
    min_improvement=0.005,
    owner="data-science@shop.example",
    description="Probability that a user active now does nothing in the next 30 days.",
    tags={"domain": "growth"},
)

MODELS = (churn,)
