from django.apps import AppConfig


class BenchAppConfig(AppConfig):
    name = "bench.benchapp"
    label = "benchapp"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        # django-logic's documented place to bind a process to a model.
        from django_logic import ProcessManager

        from .models import LogicAccount, LogicAccountProcess

        ProcessManager.bind_model_process(LogicAccount, LogicAccountProcess, state_field="state")
