"""The feature store: the one object a notebook or a service needs.

``FeatureStore.from_env()`` reads the settings (``KEEL_*``), opens the lakehouse and loads the
project's declarations. Training sets come from the offline side
(``keel.features.training_sets.OfflineStore``: ``get_training_set``, ``resolve``); online
values from the online store (``keel.online``: ``get_online_features``), both with the same
feature names (``group.feature`` or an unambiguous bare name).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from keel.config import Settings
from keel.features.training_sets import OfflineStore, TrainingSet, TrainingSetError
from keel.lakehouse.tables import Lakehouse
from keel.online.lookup import LookupPlan, OnlineFeatures, lookup, plan_lookup
from keel.online.store import OnlineStore, OnlineStoreError
from keel.project import Project

__all__ = ["FeatureStore", "TrainingSet", "TrainingSetError"]


class FeatureStore(OfflineStore):
    """Training sets, feature tables and online values of one project."""

    def __init__(
        self, lake: Lakehouse, project: Project, online: OnlineStore | None = None, *, settings: Settings | None = None
    ) -> None:
        super().__init__(lake, project, settings=settings)
        self._online = online
        self._plans: dict[tuple[str, ...], LookupPlan] = {}

    @property
    def online(self) -> OnlineStore:
        """The online store (from the environment's settings unless one was given)."""
        if self._online is None:
            self._online = OnlineStore.from_settings(self.settings or Settings.from_env())
        return self._online

    def get_online_features(
        self, entity_ids: Sequence, features: Sequence[str], *, now: dt.datetime | None = None
    ) -> OnlineFeatures:
        """Each entity's latest online values of ``features`` (in that order), with age and status.

        ``features`` as for training sets (``group.feature`` or an unambiguous bare name), all
        of one entity and all from groups declared ``online=True``.
        """
        ask = tuple(features) if not isinstance(features, str) else (features,)
        plan = self._plans.get(ask)
        if plan is None:
            try:
                resolved = self.resolve(features)
            except TrainingSetError as exc:
                raise OnlineStoreError(str(exc)) from None
            plan = self._plans[ask] = plan_lookup(resolved)
        return lookup(self.online, plan, entity_ids, now=now)
