"""Conditions: lastTransitionTime moves only when status changes; Ready summarises in order."""

from __future__ import annotations

from swi_operator.conditions import Condition, find, merge, ready


def test_new_condition_gets_now():
    merged = merge([], [Condition("A", "True", "Ok", "fine")], generation=3, now="T1")
    assert merged == [
        {
            "type": "A",
            "status": "True",
            "reason": "Ok",
            "message": "fine",
            "observedGeneration": 3,
            "lastTransitionTime": "T1",
        }
    ]


def test_same_status_keeps_transition_time_even_if_reason_changes():
    first = merge([], [Condition("A", "False", "Throttled", "x")], 1, now="T1")
    second = merge(first, [Condition("A", "False", "CloudUnavailable", "y")], 2, now="T2")
    assert second[0]["lastTransitionTime"] == "T1"
    assert (second[0]["reason"], second[0]["observedGeneration"]) == ("CloudUnavailable", 2)


def test_status_change_moves_transition_time():
    first = merge([], [Condition("A", "False", "Throttled", "x")], 1, now="T1")
    second = merge(first, [Condition("A", "True", "Ok", "y")], 1, now="T2")
    assert second[0]["lastTransitionTime"] == "T2"


def test_untouched_conditions_are_kept():
    first = merge(
        [], [Condition("A", "True", "Ok", ""), Condition("B", "True", "Ok", "")], 1, now="T1"
    )
    second = merge(first, [Condition("B", "False", "Bad", "")], 2, now="T2")
    assert find(second, "A") == Condition("A", "True", "Ok", "")
    assert second[0]["observedGeneration"] == 1


def test_ready_is_first_failing_condition():
    summary = ready(
        [
            Condition("A", "True", "Ok", ""),
            Condition("B", "False", "CredentialLimitReached", "full"),
            Condition("C", "Unknown", "Waiting", ""),
        ]
    )
    assert (summary.type, summary.status, summary.reason) == (
        "Ready",
        "False",
        "CredentialLimitReached",
    )
    assert summary.message == "B: full"
    assert ready([Condition("A", "True", "Ok", "")]).is_true
    assert ready([Condition("A", "Unknown", "Waiting", "")]).status == "Unknown"
