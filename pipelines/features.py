"""Feature groups of the shop: what a user buys, how they browse, who they are, and how the two relate."""

from keel.dsl import Derived, Feature, FeatureGroup
from pipelines.entities import user
from pipelines.sources import clicks, signups, transactions

user_transactions = FeatureGroup(
    name="user_transactions",
    entity=user,
    source=transactions,
    ttl="30d",
    online=True,
    owner="payments@shop.example",
    description="Spend and purchase rhythm per user.",
    tags={"domain": "payments"},
    features=(
        Feature("txn_count_24h", "count", window="24h"),
        Feature("txn_count_7d", "count", window="7d"),
        Feature("txn_count_30d", "count", window="30d"),
        Feature("amount_sum_7d", "sum", "amount", window="7d", where="NOT is_refund"),
        Feature("amount_avg_30d", "avg", "amount", window="30d", where="NOT is_refund"),
        Feature("amount_max_30d", "max", "amount", window="30d"),
        Feature("amount_std_30d", "stddev", "amount", window="30d"),
        Feature("refund_count_30d", "count", window="30d", where="is_refund"),
        Feature("categories_30d", "count_distinct", "merchant_category", window="30d"),
        Feature("last_amount", "last", "amount", window="30d"),
        Derived("txn_trend", "txn_count_7d / nullif(txn_count_30d / 4.0, 0)"),
    ),
)

user_clicks = FeatureGroup(
    name="user_clicks",
    entity=user,
    source=clicks,
    ttl="30d",
    online=True,
    owner="web@shop.example",
    description="Browsing intensity and intent per user.",
    tags={"domain": "web"},
    features=(
        Feature("click_count_24h", "count", window="24h"),
        Feature("click_count_7d", "count", window="7d"),
        Feature("click_count_30d", "count", window="30d"),
        Feature("sessions_7d", "count_distinct", "session_id", window="7d"),
        Feature("checkout_views_7d", "count", window="7d", where="page = 'checkout'"),
        Feature("dwell_avg_7d", "avg", "dwell_s", window="7d"),
        Feature("last_page", "last", "page", window="30d"),
        Derived("clicks_per_session_7d", "click_count_7d / nullif(sessions_7d, 0)"),
    ),
)

user_profile = FeatureGroup(
    name="user_profile",
    entity=user,
    source=signups,
    # Online too: the churn model reads the plan, country, device and age at serving time.
    online=True,
    owner="growth@shop.example",
    description="What the user told us at sign-up.",
    tags={"domain": "growth"},
    features=(
        Feature("plan", "last", "plan"),
        Feature("country", "last", "country"),
        Feature("signup_device", "last", "device"),
        Feature("age", "last", "age"),
        Feature("signed_up_at", "last", "event_ts"),
    ),
)

user_engagement = FeatureGroup(
    name="user_engagement",
    entity=user,
    upstream=(user_transactions, user_clicks),
    online=True,
    owner="data-science@shop.example",
    description="How browsing turns into buying.",
    features=(
        Derived("conversion_7d", "user_transactions.txn_count_7d / nullif(user_clicks.click_count_7d, 0)"),
        Derived("checkout_to_txn_7d", "user_transactions.txn_count_7d / nullif(user_clicks.checkout_views_7d, 0)"),
        Derived(
            "active_7d",
            "coalesce(user_transactions.txn_count_7d, 0) + coalesce(user_clicks.click_count_7d, 0) > 0",
            type="bool",
        ),
    ),
)

FEATURE_GROUPS = (user_transactions, user_clicks, user_profile, user_engagement)
