"""Optuna's own tables (studies, trials, intermediate values...) in the platform's database, created here once rather
than by whichever worker touches Optuna first (two at once would race to create them)."""

from django.db import migrations


def create_optuna_tables(apps, schema_editor) -> None:
    from apps.tuning.optuna_store import optuna_storage

    optuna_storage(create_tables=True).remove_session()


class Migration(migrations.Migration):
    # Optuna writes through its own connection: on SQLite, a transaction of Django's around it would hold the lock.
    atomic = False

    dependencies = [("tuning", "0001_initial")]

    operations = [migrations.RunPython(create_optuna_tables, migrations.RunPython.noop, elidable=False)]
