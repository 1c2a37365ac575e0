"""The database itself refuses to change a review decision: an UPDATE raises on SQLite and PostgreSQL, a DELETE
raises on PostgreSQL (SQLite's test runs empty tables with DELETE; PostgreSQL's with TRUNCATE, which no row trigger
sees)."""

from django.db import migrations

_POSTGRES = [
    """
    CREATE OR REPLACE FUNCTION audits_reviewdecision_append_only() RETURNS trigger AS $$
    BEGIN
        RAISE EXCEPTION 'review decisions are append-only';
    END;
    $$ LANGUAGE plpgsql;
    """,
    """
    CREATE TRIGGER audits_reviewdecision_no_update BEFORE UPDATE OR DELETE ON audits_reviewdecision
    FOR EACH ROW EXECUTE FUNCTION audits_reviewdecision_append_only();
    """,
]
_SQLITE = [
    """
    CREATE TRIGGER audits_reviewdecision_no_update BEFORE UPDATE ON audits_reviewdecision
    BEGIN SELECT RAISE(ABORT, 'review decisions are append-only'); END;
    """,
]


def forwards(apps, schema_editor) -> None:
    statements = {"postgresql": _POSTGRES, "sqlite": _SQLITE}.get(schema_editor.connection.vendor, [])
    for statement in statements:
        schema_editor.execute(statement)


def backwards(apps, schema_editor) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP TRIGGER IF EXISTS audits_reviewdecision_no_update ON audits_reviewdecision")
        schema_editor.execute("DROP FUNCTION IF EXISTS audits_reviewdecision_append_only()")
    elif schema_editor.connection.vendor == "sqlite":
        schema_editor.execute("DROP TRIGGER IF EXISTS audits_reviewdecision_no_update")


class Migration(migrations.Migration):
    dependencies = [("audits", "0001_initial")]

    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
