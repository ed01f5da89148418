"""The README's examples run as written (those that need no server of their own; the Celery example
runs in .ci/extras.py with a real worker)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.core.management import call_command

from tests.testapp import models

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


@pytest.mark.django_db(transaction=True)
def test_the_api_snippets_calls_run_in_sequence():
    # The snippet's Cat and CatStateMachine are tests.testapp's (the seed README's machine).
    block = re.search(r"```python\n(.*?)```", section("The API"), re.S)[1]
    calls = block[block.index("\ncat = Cat.objects.create()") :]
    namespace = {"Cat": models.Cat, "ALIVE": models.ALIVE, "DEAD": models.DEAD, "UNKNOWN": models.UNKNOWN}
    exec(calls, namespace)
    cats = [models.Cat.objects.get(pk=namespace[name].pk) for name in ("cat", "old_cat", "lucky_cat")]
    assert [c.state for c in cats] == [models.DEAD] * 3
    assert cats[1].cause == "old age"


def test_the_dsm_graph_example_is_what_the_command_prints(capsys):
    example = re.search(r"\$ python manage.py dsm_graph shop.Cat\n(.*?)\$ ", section("Operations"), re.S)[1]
    call_command("dsm_graph", "testapp.Cat")
    assert capsys.readouterr().out == example.replace("shop.Cat", "testapp.Cat")
