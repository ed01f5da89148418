from django.db import migrations, models

# On PostgreSQL the fence check, the mark's upsert and the row-lock bound run inside the
# SELECT ... FOR UPDATE that reads the row (fence.py), which saves a round trip per transition.
# The function returns the mark after the call: equal to p_token when accepted, higher when stale.
CREATE_FUNCTION = """
CREATE OR REPLACE FUNCTION dsm_redis_fence(p_key text, p_token bigint, p_lock_timeout text)
RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    mark bigint;
BEGIN
    IF p_lock_timeout IS NOT NULL THEN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
    END IF;
    INSERT INTO dsm_redis_fencing_mark (object_key, token) VALUES (p_key, p_token)
    ON CONFLICT (object_key) DO UPDATE SET token = EXCLUDED.token
        WHERE dsm_redis_fencing_mark.token <= EXCLUDED.token
    RETURNING token INTO mark;
    IF mark IS NULL THEN
        SELECT token INTO mark FROM dsm_redis_fencing_mark WHERE object_key = p_key;
    END IF;
    RETURN mark;
END
$$;
"""
DROP_FUNCTION = "DROP FUNCTION IF EXISTS dsm_redis_fence(text, bigint, text);"


def create_function(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE_FUNCTION)


def drop_function(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP_FUNCTION)


class Migration(migrations.Migration):
    initial = True
    dependencies: list = []

    operations = [
        migrations.CreateModel(
            name="FencingMark",
            fields=[
                ("object_key", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("token", models.BigIntegerField()),
            ],
            options={"db_table": "dsm_redis_fencing_mark", "verbose_name": "fencing mark"},
        ),
        migrations.RunPython(create_function, drop_function),
    ]
