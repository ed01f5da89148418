"""Declaring machines: validation at class definition, states, labels, path finding (no database)."""

from __future__ import annotations

import enum

import pytest
from django.core.exceptions import ImproperlyConfigured

from dsm_redis import State, StateMachine, TransitionException, precondition
from dsm_redis.machine import plain
from tests.testapp.models import Cat, CatStateMachine


def noop(self, instance, transition):
    pass


def test_half_edge_is_rejected_at_class_definition():
    with pytest.raises(ImproperlyConfigured, match=r"transitions\[0\].*State \| callable-or-None \| State"):

        class Broken(StateMachine):
            transitions = [State(0) | noop]


def test_non_callable_side_effect_is_rejected():
    with pytest.raises(ImproperlyConfigured, match="callable-or-None"):
        State(0) | "survive"


def test_duplicate_edge_name_from_one_state_is_ambiguous():
    with pytest.raises(ImproperlyConfigured, match="two edges from 0 use the side effect 'noop'"):

        class Broken(StateMachine):
            transitions = [State(0) | noop | State(1), State(0) | noop | State(2)]


def test_start_must_be_named_by_a_transition():
    with pytest.raises(ImproperlyConfigured, match="start is 9"):

        class Broken(StateMachine):
            start = 9
            transitions = [State(0) | None | State(1)]


def test_empty_transitions_and_reserved_names():
    with pytest.raises(ImproperlyConfigured, match="empty"):

        class Empty(StateMachine):
            transitions = []

    def transition_to(self, instance, transition):
        pass

    with pytest.raises(ImproperlyConfigured, match="shadows"):

        class Shadow(StateMachine):
            transitions = [State(0) | transition_to | State(1)]

    def state_machine(self, instance, transition):
        pass

    with pytest.raises(ImproperlyConfigured, match="shadows"):  # the seed's obj.state_machine.state_machine

        class ShadowsTheSeedName(StateMachine):
            transitions = [State(0) | state_machine | State(1)]


def test_as_task_is_reserved_for_celery():
    def ship(self, instance, transition, *, as_task=False):
        pass

    with pytest.raises(ImproperlyConfigured, match="as_task"):

        class Broken(StateMachine):
            transitions = [State(0) | ship | State(1)]


def test_states_may_be_ints_strings_and_enums_and_compare_by_value():
    class Colour(enum.Enum):
        RED = "red"
        BLUE = "blue"

    class Machine(StateMachine):
        transitions = [State(Colour.RED) | None | State(Colour.BLUE), State("blue") | None | State(3)]

    assert Machine._states == {"red", "blue", 3}
    assert State(Colour.RED) == "red" and State("red") == State(Colour.RED)
    with pytest.raises(TransitionException, match="no state 'green'"):
        Machine("m", "state").check_known("green")


def test_shortest_path_and_labels():
    machine = CatStateMachine("state_machine", "state")
    cat = Cat(state=0)
    assert machine.edge_toward(cat, 2).end == 2  # direct rip beats survive + None
    assert machine.label(cat, 1) == "1 (Alive)"
    cat.state = 2
    assert machine.edge_toward(cat, 2) is None
    with pytest.raises(TransitionException, match=r"no path from 2 \(Dead\) to 0 \(Unknown\)"):
        machine.edge_toward(cat, 0)


def test_transition_objects_carry_the_seed_attributes():
    @precondition(lambda obj: True)
    def go(self, instance, transition):
        pass

    class Machine(StateMachine):
        transitions = [State(0) | go | State(1)]

    (t,) = Machine._transitions
    assert (t.start, t.end, t.side_effect, t.fencing_token) == (0, 1, go, None)
    assert t.precondition is go._precondition


def test_graph_questions_on_plain_state_values():
    from tests.testapp.models import ALIVE, DEAD, UNKNOWN, CatStateMachine, SeedStateMachine, TestStates

    cat = CatStateMachine("state_machine", "state")
    assert [t.name for t in cat.edges_from(UNKNOWN)] == ["survive", "rip"]
    assert [t.name for t in cat.edges_from(UNKNOWN, to=DEAD)] == ["rip"]
    assert cat.first_edge_toward(DEAD, DEAD) is None
    assert cat.path_states(UNKNOWN, DEAD) == [UNKNOWN]  # the direct edge, not through Alive
    assert cat.path_states(ALIVE, DEAD) == [ALIVE]
    with pytest.raises(TransitionException, match="no path"):
        cat.path_states(DEAD, ALIVE)
    seed = SeedStateMachine("state_machine", "state")
    middle_enabled = TestStates.TRANSITION_TO_MIDDLE_ENABLED
    assert seed.path_states(TestStates.START, TestStates.MIDDLE) == [TestStates.START, middle_enabled]


def test_graph_queries_name_an_edge_a_target_and_a_path():
    from tests.testapp.models import ALIVE, DEAD, UNKNOWN

    machine = CatStateMachine("state_machine", "state")
    assert machine.edge_named(UNKNOWN, "survive").end == ALIVE
    with pytest.raises(TransitionException, match=r"cannot call edge 'survive' from 2 \(Dead\); it starts from"):
        machine.edge_named(DEAD, "survive", model=Cat)
    assert machine.edge_to(UNKNOWN, DEAD).name == "rip"
    with pytest.raises(TransitionException, match=r"cannot transition from 2 to 0: no such edge"):
        machine.edge_to(DEAD, UNKNOWN)
    assert machine.shortest_path(DEAD, DEAD) == []
    assert [(t.start, t.end) for t in machine.shortest_path(UNKNOWN, DEAD)] == [(UNKNOWN, DEAD)]
    assert machine.edges == CatStateMachine._transitions


def test_an_ambiguous_target_names_its_edges():
    def a(self, instance, transition):
        pass

    def b(self, instance, transition):
        pass

    class Fork(StateMachine):
        transitions = [State(0) | a | State(1), State(0) | b | State(1)]

    with pytest.raises(TransitionException, match="ambiguous transition 0 -> 1; call one of the edges instead: a, b"):
        Fork("m", "state").edge_to(0, 1)


def test_the_walk_is_the_one_transition_through_takes():
    from tests.testapp.models import SeedStateMachine, TestStates

    seed = SeedStateMachine("state_machine", "state")
    path = seed.shortest_path(TestStates.START, TestStates.MIDDLE)
    assert [t.start for t in path] == seed.path_states(TestStates.START, TestStates.MIDDLE)
    # Each step is the first edge toward the target from where the previous one ended.
    for step in path:
        assert seed.first_edge_toward(step.start, plain(TestStates.MIDDLE)) == step


def test_a_machine_is_found_by_model_and_name():
    from dsm_redis.machine import attached_machine

    machine = attached_machine(Cat, "state_machine")
    assert isinstance(machine, CatStateMachine) and machine.field_name == "state_machine"
    assert attached_machine(Cat, "state") is None  # a model field, not a machine
    assert attached_machine(Cat, "objects") is None
    assert attached_machine(Cat, "nope") is None
    assert attached_machine(Cat, ["state_machine"]) is None  # type: ignore[arg-type]


def test_the_public_api_is_the_package_all():
    import dsm_redis
    from dsm_redis.fields import BoundStateMachine

    assert dsm_redis.BoundStateMachine is BoundStateMachine
    assert isinstance(Cat(state=0).state_machine, dsm_redis.BoundStateMachine)
    assert all(hasattr(dsm_redis, name) for name in dsm_redis.__all__)
    assert "StateValue" in dsm_redis.__all__
