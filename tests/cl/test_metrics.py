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


def test_table_groups_seeds_and_flags_differences():
    from sparsekern_cl.table import compare_groups, group_results, markdown_table

    def res(method, seed, cil, til, buffer=200):
        return {
            "complete": True,
            "config": {"method": method, "seed": seed, "buffer_size": buffer, "sparsity": 0.0},
            "avg_acc": {"class_il": cil, "task_il": til},
            "train_flops": 1e9,
            "wall_clock_s": 1.0,
        }

    results = [res("joint", s, 90 + s, 99) for s in range(3)] + [res("finetune", s, 20 + s, 95) for s in range(3)]
    results += [res("er", s, (21, 23, 22)[s], 96) for s in range(3)]
    rows = group_results(results)
    assert [r["label"] for r in rows] == ["joint", "er (buffer 200)", "finetune"]
    assert rows[0]["class_il"]["mean"] == pytest.approx(91.0) and rows[0]["class_il"]["std"] == pytest.approx(1.0)
    pairs = {(p["a"], p["b"]): p for p in compare_groups(rows)}
    assert pairs[("joint", "finetune")]["significant"]
    # 1 point apart on average, paired differences 1, 2, 0 over 3 seeds: within noise
    assert not pairs[("er (buffer 200)", "finetune")]["significant"]
    assert "91.00 ± 1.00" in markdown_table(rows)


def test_paired_t_test_and_holm_correction():
    from sparsekern_cl.table import compare_paired, holm, paired_test

    a = {0: 1.2, 1: 0.4, 2: 2.1, 3: 1.6, 4: 0.9, 9: 5.0}  # seed 9 has no partner: left out
    b = {0: 0.3, 1: 0.5, 2: 1.0, 3: 0.2, 4: 0.8}
    t = paired_test(a, b)
    # scipy.stats.ttest_rel on the five pairs: t = 2.34066, p = 0.079321
    assert t["n"] == 5 and t["t"] == pytest.approx(2.34066, rel=1e-5) and t["p"] == pytest.approx(0.079321, rel=1e-4)
    assert paired_test({0: 1.0}, {0: 0.0})["p"] is None  # one pair: not tested
    assert paired_test({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})["p"] == 0.0  # identical differences
    assert holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    fam = compare_paired([("x", "y", a, b), ("x", "x", a, a)])
    assert [c["significant"] for c in fam] == [False, False] and fam[1]["p_holm"] == 1.0


def test_select_best_uses_validation_runs_only():
    from sparsekern_cl.table import select_best

    def res(lr, seed, cil, split="val"):
        cfg = {
            "method": "er",
            "seed": seed,
            "buffer_size": 200,
            "sparsity": 0.0,
            "lr": lr,
            "alpha": 0.3,
            "beta": 0.5,
            "ewc_lambda": 10.0,
        }
        return {"config": cfg, "scenario": {"eval_split": split}, "avg_acc": {"class_il": cil}}

    best = select_best([res(0.1, 0, 60), res(0.1, 1, 70), res(0.3, 0, 66), res(0.3, 1, 66)])
    assert best["er (buffer 200)"]["hyperparameters"]["lr"] == 0.3  # mean 66 beats mean 65
    assert best["er (buffer 200)"]["candidates"] == 2
    with pytest.raises(ValueError, match="test split"):
        select_best([res(0.1, 0, 60, split="test")])
