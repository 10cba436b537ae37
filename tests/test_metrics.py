import pytest

from hf_continual.metrics import (
    backward_transfer,
    continual_metrics,
    forgetting,
    forgetting_reduction,
    forward_transfer,
)

R3 = [
    [0.9, 0.2, 0.1],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 0.95],
]
B3 = [0.1, 0.15, 0.05]


def test_three_tasks_hand_computed():
    m = continual_metrics(R3, B3)
    assert m["acc"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert m["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert m["fwt"] == pytest.approx(((0.2 - 0.15) + (0.3 - 0.05)) / 2)
    # max over l < 2 of R[l][0] = 0.9, of R[l][1] = 0.8
    assert m["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)


def test_forgetting_uses_best_earlier_not_diagonal():
    R = [[0.5, 0.0, 0.0], [0.9, 0.6, 0.0], [0.4, 0.6, 0.7]]
    assert forgetting(R) == pytest.approx(((0.9 - 0.4) + (0.6 - 0.6)) / 2)
    assert backward_transfer(R) == pytest.approx(((0.4 - 0.5) + 0.0) / 2)


def test_single_task_edge_case():
    m = continual_metrics([[0.7]], [0.2])
    assert m == {"acc": pytest.approx(0.7), "bwt": None, "fwt": None, "forgetting": None}


def test_two_tasks_edge_case():
    R = [[0.8, 0.3], [0.6, 0.9]]
    m = continual_metrics(R, [0.1, 0.2])
    assert m["acc"] == pytest.approx(0.75)
    assert m["bwt"] == pytest.approx(-0.2)
    assert m["fwt"] == pytest.approx(0.1)
    assert m["forgetting"] == pytest.approx(0.2)


def test_no_initial_scores_gives_no_fwt():
    assert continual_metrics(R3)["fwt"] is None


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "empty"),
        ([[0.1, 0.2]], "square"),
        ([[0.1, 0.2], [0.3]], "row 1 has 1"),
        ([[0.1, float("nan")], [0.3, 0.4]], r"R\[0\]\[1\]"),
    ],
)
def test_bad_matrices_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        continual_metrics(bad)


def test_b_length_mismatch():
    with pytest.raises(ValueError, match="initial scores"):
        forward_transfer(R3, [0.1])


def test_forgetting_reduction():
    assert forgetting_reduction(0.1, 0.4) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="baseline"):
        forgetting_reduction(0.1, 0.0)
