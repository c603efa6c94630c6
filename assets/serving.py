"""The serving process in the asset graph: one external asset per served model.

Serving is not a Dagster computation (``keel serve`` runs on its own, see serving/), but it
sits in the middle of the data's path: it answers with the champion the registry names, from
the features the online store holds, and logs every answer to the inference log that
monitoring reads. ``serving/<model>`` stands for that process, so the lineage reads
features -> online -> serving -> inference log -> monitoring, and models -> serving.
"""

from collections.abc import Sequence

import dagster as dg

from assets.models import champion_key
from keel.models.spec import ModelSpec
from keel.project import Project


def serving_key(spec: ModelSpec) -> dg.AssetKey:
    return dg.AssetKey(["serving", spec.name])


def serving_spec(project: Project, spec: ModelSpec) -> dg.AssetSpec:
    groups = list(dict.fromkeys(ref.split(".", 1)[0] for ref in spec.feature_refs(project)))
    online = [g for g in groups if project.group(g).online]
    offline = [g for g in groups if g not in online]
    return dg.AssetSpec(
        serving_key(spec),
        deps=[champion_key(spec), *(dg.AssetKey(["online", g]) for g in online)],
        group_name="serving",
        kinds={"fastapi"},
        owners=[spec.owner] if spec.owner and "@" in spec.owner else None,
        tags={"keel/model": spec.name},
        description=(
            f"'{spec.name}' served by `keel serve` (POST /v1/models/{spec.name}/predict and the Open Inference "
            "Protocol): the versions in the roles 'champion' and 'challenger' in MLflow (alias or stage), hot-swapped "
            f"when they move, features hydrated by entity id from the online store ({', '.join(online) or 'none'})"
            + (f"; {', '.join(offline)} are not online and take their training defaults" if offline else "")
            + ". Every answer goes to the inference log."
        ),
        metadata={"endpoint": f"/v1/models/{spec.name}/predict", "online_groups": dg.MetadataValue.json(online)},
    )


def serving_definitions(project: Project, models: Sequence[ModelSpec]) -> dg.Definitions:
    return dg.Definitions(assets=[serving_spec(project, spec) for spec in models])
