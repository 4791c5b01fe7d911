"""CL metrics on hand-made accuracy matrices."""

import pytest

from sparsekern_cl.metrics import (
    average_accuracy,
    average_accuracy_curve,
    backward_transfer,
    forgetting,
    forward_transfer,
    summarize,
)

# R[i][j]: accuracy on task j after training task i
R = [
    [90.0, 20.0, 10.0],
    [70.0, 80.0, 30.0],
    [60.0, 50.0, 95.0],
]
B = [10.0, 25.0, 5.0]


def test_average_accuracy():
    assert average_accuracy(R) == pytest.approx((60 + 50 + 95) / 3)


def test_average_accuracy_curve():
    assert average_accuracy_curve(R) == pytest.approx([90.0, 75.0, (60 + 50 + 95) / 3])


def test_backward_transfer():
    # ((60 - 90) + (50 - 80)) / 2
    assert backward_transfer(R) == pytest.approx(-30.0)


def test_forward_transfer():
    # ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((20 - 25) + (30 - 5)) / 2
    assert forward_transfer(R, B) == pytest.approx(10.0)


def test_forgetting_uses_best_earlier_accuracy():
    # task 0: max(90, 70) - 60 = 30; task 1: max(80) - 50 = 30
    assert forgetting(R) == pytest.approx(30.0)
    # a task that improves after its own training: best is the later row
    R2 = [[50.0, 0.0, 0.0], [70.0, 60.0, 0.0], [65.0, 60.0, 90.0]]
    assert forgetting(R2) == pytest.approx(((70 - 65) + (60 - 60)) / 2)


def test_no_forgetting_perfect_matrix():
    P = [[100.0, 0.0], [100.0, 100.0]]
    assert backward_transfer(P) == 0.0
    assert forgetting(P) == 0.0
    assert average_accuracy(P) == 100.0


def test_single_task_has_zero_transfer():
    assert backward_transfer([[80.0]]) == 0.0
    assert forward_transfer([[80.0]], [10.0]) == 0.0
    assert forgetting([[80.0]]) == 0.0


def test_summarize_and_shape_errors():
    s = summarize(R, B)
    assert s["avg_acc"] == pytest.approx(205 / 3) and s["bwt"] == pytest.approx(-30.0)
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[1.0, 2.0]])
    with pytest.raises(ValueError, match="b: expected 3"):
        forward_transfer(R, [1.0])
