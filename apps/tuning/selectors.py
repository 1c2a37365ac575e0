"""Reads of studies and trials; every one takes the tenant first and never yields another tenant's rows."""

from django.db.models import Count, QuerySet

from apps.tenancy.models import Tenant

from .models import Study, Trial, TrialState


def studies_of(*, tenant: Tenant) -> QuerySet[Study]:
    return Study.objects.for_tenant(tenant).select_related("training_file", "validation_file", "best_trial__job")


def study_get(*, tenant: Tenant, public_id: str) -> Study | None:
    return studies_of(tenant=tenant).filter(public_id=public_id).first()


def trials_of(*, study: Study) -> QuerySet[Trial]:
    return Trial.objects.filter(study=study, tenant_id=study.tenant_id).select_related("study", "job", "retry_of")


def trial_get(*, study: Study, number: int) -> Trial | None:
    return trials_of(study=study).filter(number=number).first()


def trial_counts(*, study: Study) -> dict[str, int]:
    counts = {state: 0 for state in TrialState.values}
    for row in Trial.objects.filter(study=study).values("state").annotate(count=Count("id")):
        counts[row["state"]] = row["count"]
    return counts


def optimisation_history(*, study: Study, trials: list[Trial]) -> list[dict]:
    """Each finished trial's value in trial order, with the best value so far (the optimisation-history chart)."""
    best, points = None, []
    minimise = study.direction == "minimize"
    for trial in sorted(trials, key=lambda trial: trial.number):
        if trial.state != TrialState.COMPLETE or trial.value is None:
            continue
        if best is None or (trial.value < best if minimise else trial.value > best):
            best = trial.value
        points.append({"number": trial.number, "value": trial.value, "best": best})
    return points
