from django.db import migrations, models

# On PostgreSQL the fence check, the mark's upsert and the row-lock bound run inside the
# SELECT ... FOR UPDATE that reads the row (fence.py), which saves a round trip per transition.
# A token is accepted when it is higher than the mark, or equal and from the same lease (owner).
# Returns the token when it accepts it, minus the mark when it refuses it.
CREATE_FUNCTION = """
CREATE OR REPLACE FUNCTION dsm_redis_fence(p_key text, p_token bigint, p_owner text, p_lock_timeout text)
RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    mark bigint;
BEGIN
    IF p_lock_timeout IS NOT NULL THEN
        PERFORM set_config('lock_timeout', p_lock_timeout, true);
    END IF;
    INSERT INTO dsm_redis_fencing_mark (object_key, token, owner) VALUES (p_key, p_token, p_owner)
    ON CONFLICT (object_key) DO UPDATE SET token = EXCLUDED.token, owner = EXCLUDED.owner
        WHERE dsm_redis_fencing_mark.token < EXCLUDED.token
           OR (dsm_redis_fencing_mark.token = EXCLUDED.token AND dsm_redis_fencing_mark.owner = EXCLUDED.owner)
    RETURNING token INTO mark;
    IF mark IS NOT NULL THEN
        RETURN mark;
    END IF;
    SELECT token INTO mark FROM dsm_redis_fencing_mark WHERE object_key = p_key;
    RETURN -mark;
END
$$;
"""
DROP_FUNCTION = "DROP FUNCTION IF EXISTS dsm_redis_fence(text, bigint, text, text);"


def create_function(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE_FUNCTION)


def drop_function(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP_FUNCTION)


class Migration(migrations.Migration):
    initial = True
    dependencies = []  # type: ignore[var-annotated]

    operations = [
        migrations.CreateModel(
            name="FencingMark",
            fields=[
                ("object_key", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("token", models.BigIntegerField()),
                ("owner", models.CharField(default="", max_length=64)),
            ],
            options={"db_table": "dsm_redis_fencing_mark", "verbose_name": "fencing mark"},
        ),
        migrations.RunPython(create_function, drop_function),
    ]
