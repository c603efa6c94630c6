"""Event sources of the demo domain: sign-ups, clicks, transactions and delayed churn labels."""

from keel.dsl import Column, EventSource
from pipelines.entities import user

COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "BR", "IN", "JP")
DEVICES = ("ios", "android", "web")
PLANS = ("free", "plus", "pro")
CURRENCIES = ("USD", "GBP", "EUR", "BRL", "INR", "JPY")
MERCHANT_CATEGORIES = ("grocery", "electronics", "fashion", "travel", "games", "home", "books")
PAGES = ("home", "search", "product", "cart", "checkout", "account", "help")

signups = EventSource(
    name="signups",
    entity=user,
    description="One event per user when they register: where, on what device, which plan.",
    owner="growth@shop.example",
    kafka_topic="shop.signups",
    columns=(
        Column("country", "string", nullable=False, allowed=COUNTRIES),
        Column("device", "string", nullable=False, allowed=DEVICES),
        Column("plan", "string", nullable=False, allowed=PLANS),
        Column("age", "int64", min=16, max=100),
    ),
)

clicks = EventSource(
    name="clicks",
    entity=user,
    description="Page views grouped into sessions.",
    owner="web@shop.example",
    kafka_topic="shop.clicks",
    columns=(
        Column("session_id", "string", nullable=False),
        Column("page", "string", nullable=False, allowed=PAGES),
        Column("device", "string", nullable=False, allowed=DEVICES),
        Column("dwell_s", "float64", min=0, max=3600),
    ),
)

transactions = EventSource(
    name="transactions",
    entity=user,
    description="Card payments at checkout.",
    owner="payments@shop.example",
    kafka_topic="shop.transactions",
    columns=(
        Column("amount", "float64", nullable=False, min=0, max=50_000),
        Column("currency", "string", nullable=False, allowed=CURRENCIES),
        Column("country", "string", nullable=False, allowed=COUNTRIES),
        Column("merchant_category", "string", nullable=False, allowed=MERCHANT_CATEGORIES),
        Column("is_refund", "bool", nullable=False),
    ),
)

churn_labels = EventSource(
    name="churn_labels",
    entity=user,
    description=(
        "Delayed label: whether the user churned (no activity) in the 30 days after "
        "event_ts; known only at label_ts = event_ts + 30 days."
    ),
    owner="data-science@shop.example",
    columns=(
        Column("churned", "bool", nullable=False),
        Column("label_ts", "timestamp", nullable=False),
    ),
)

SOURCES = (signups, clicks, transactions, churn_labels)
