"""Optuna's side of a study: its RDB storage on the platform's own database (SQLite or PostgreSQL, the connection
Django uses), and the sampler and pruner a study asked for, rebuilt from its row whenever a worker needs them (Optuna
keeps neither in its storage).

Only workers call this (the `cpu` worker that advances studies, the `gpu` worker whose trial reports to the pruner):
web pages read the mirrored rows of apps.tuning.models. Never call it inside a Django transaction: on SQLite the
transaction holds the database's write lock and Optuna's own connection would wait on it.
"""

from urllib.parse import quote

import optuna
from django.db import connection
from sqlalchemy.pool import NullPool

from .models import PrunerKind, SamplerKind, Study
from .search_space import grid_of

# Optuna logs every trial at INFO; the job events already say what a user needs.
optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_url() -> str:
    """SQLAlchemy's URL for the database Django uses now (the test database under pytest)."""
    database = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{database['NAME']}"
    user = quote(database.get("USER") or "", safe="")
    password = quote(database.get("PASSWORD") or "", safe="")
    credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    port = f":{database['PORT']}" if database.get("PORT") else ""
    return f"postgresql+psycopg://{credentials}{database.get('HOST') or ''}{port}/{database['NAME']}"


def optuna_storage(*, create_tables: bool = False) -> optuna.storages.RDBStorage:
    # NullPool: no connection outlives its use (a pool would hold connections between tasks, and PostgreSQL then
    # refuses to drop a database); the timeout lets SQLite writers queue behind Django's instead of failing.
    engine_kwargs: dict = {"poolclass": NullPool}
    if connection.vendor == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": 30}
    return optuna.storages.RDBStorage(storage_url(), engine_kwargs=engine_kwargs, skip_table_creation=not create_tables)


def tpe_startup_trials(n_trials: int) -> int:
    """Random trials before TPE models the results: Optuna's 10 would leave a 12-trial study nearly all random."""
    return max(2, min(10, n_trials // 3))


def sampler_for(study: Study, *, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """A fresh sampler seeded with the study's seed and the number of trials asked so far: each ask is
    reproducible, although samplers live for one ask in one process here."""
    if study.sampler == SamplerKind.GRID:
        # The grid's order is shuffled by its seed and trials refer to grid points by position: one seed for the
        # whole study, or a later ask would read another order and repeat a combination.
        return optuna.samplers.GridSampler(grid_of(study.search_space), seed=study.seed)
    seed = study.seed + trials_so_far
    if study.sampler == SamplerKind.RANDOM:
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials running in parallel count as bad guesses, so parallel asks spread out.
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=tpe_startup_trials(study.n_trials),
        multivariate=True,
        constant_liar=study.max_parallel_trials > 1,
    )


def pruner_defaults(kind: str, *, n_trials: int, eval_every_steps: int, max_steps: int) -> dict:
    """The settings each pruner gets unless the study gives its own."""
    if kind == PrunerKind.MEDIAN:
        return {"n_startup_trials": max(1, min(5, n_trials // 4)), "n_warmup_steps": 0, "interval_steps": 1}
    if kind == PrunerKind.SUCCESSIVE_HALVING:
        return {"min_resource": max(1, eval_every_steps), "reduction_factor": 3, "min_early_stopping_rate": 0}
    if kind == PrunerKind.HYPERBAND:
        return {
            "min_resource": max(1, eval_every_steps),
            "max_resource": max_steps or "auto",
            "reduction_factor": 3,
        }
    return {}


PRUNER_OPTION_NAMES = {
    PrunerKind.MEDIAN: ("n_startup_trials", "n_warmup_steps", "interval_steps"),
    PrunerKind.SUCCESSIVE_HALVING: ("min_resource", "reduction_factor", "min_early_stopping_rate"),
    PrunerKind.HYPERBAND: ("min_resource", "max_resource", "reduction_factor"),
    PrunerKind.NONE: (),
}


def pruner_for(study: Study) -> optuna.pruners.BasePruner:
    options = study.pruner_options or {}
    if study.pruner == PrunerKind.MEDIAN:
        return optuna.pruners.MedianPruner(**options)
    if study.pruner == PrunerKind.SUCCESSIVE_HALVING:
        return optuna.pruners.SuccessiveHalvingPruner(**options)
    if study.pruner == PrunerKind.HYPERBAND:
        return optuna.pruners.HyperbandPruner(**options)
    return optuna.pruners.NopPruner()


def optuna_study_for_results(study: Study) -> optuna.Study:
    """The study loaded to record results and read them (tell, importances), with a sampler that does nothing after
    a trial: GridSampler's after-trial hook calls `Study.stop()`, which raises outside `optimize`."""
    return optuna.load_study(
        study_name=study.optuna_study_name,
        storage=optuna_storage(),
        sampler=optuna.samplers.RandomSampler(seed=study.seed),
        pruner=pruner_for(study),
    )


def optuna_study(study: Study, *, trials_so_far: int = 0) -> optuna.Study:
    """The study in Optuna's tables, created (with its enqueued trials) the first time a worker asks for it."""
    storage = optuna_storage()
    sampler, pruner = sampler_for(study, trials_so_far=trials_so_far), pruner_for(study)
    try:
        return optuna.load_study(study_name=study.optuna_study_name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        created = optuna.create_study(
            study_name=study.optuna_study_name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction=study.direction,
        )
        for params in study.enqueued_trials:
            created.enqueue_trial(params, skip_if_exists=True)
        return created
