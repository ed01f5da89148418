from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Account",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("state", models.CharField(default="a", max_length=1)),
                ("balance", models.BigIntegerField(default=0)),
            ],
        ),
        migrations.CreateModel(
            name="Entry",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("account_id", models.BigIntegerField(db_index=True)),
                ("op", models.CharField(max_length=40)),
                ("step", models.IntegerField()),
                ("from_state", models.CharField(max_length=1)),
                ("from_balance", models.BigIntegerField()),
                ("to_state", models.CharField(max_length=1)),
                ("to_balance", models.BigIntegerField()),
                ("token", models.BigIntegerField(null=True)),
                ("owner", models.CharField(blank=True, max_length=64)),
            ],
        ),
    ]
