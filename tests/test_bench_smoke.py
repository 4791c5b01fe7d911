"""The benchmark runner on tiny cases, so the suite cannot silently break (no speed is asserted)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from sparsekern.bench import PRESETS, Case, Selection, Skip, TimingConfig, availability, expand, network_layers, prepare
from sparsekern.bench.__main__ import main
from sparsekern.bench.cases import SHAPE_SETS
from sparsekern.bench.goals import goal_fields, goal_for
from sparsekern.bench.report import (
    README_END,
    README_START,
    _network_lines,
    _vs_torch_sparse_lines,
    readme_csvs,
    update_readme,
    write_readme,
)
from sparsekern.bench.timing import time_cpu, time_cpu_rounds
from sparsekern.formats import BSRMeta

TINY_LINEAR = SHAPE_SETS["tiny-linear"][0]
TINY_CONV = SHAPE_SETS["tiny-conv"][0]
TINY_MODEL = SHAPE_SETS["tiny-model"][0]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_smoke_preset_writes_csv_markdown_and_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nkept text\n")
    argv = ["--preset", "smoke", "--out", str(tmp_path), "--name", "smoke", "--threads", "1", "--readme", str(readme)]
    assert main(argv) == 0
    rows = _rows(tmp_path / "smoke.csv")
    assert len(rows) == len(expand(PRESETS["smoke"]))
    by_provider = {}
    for r in rows:
        by_provider.setdefault(r["provider"], []).append(r)
        assert r["status"] in ("ok", "skipped"), (r["case_id"], r["reason"])
        assert r["threads"] == "1" and r["torch"] == torch.__version__ and r["commit"]
        if r["status"] == "skipped":
            assert r["reason"], r["case_id"]
        else:
            p20, p50, p80 = float(r["p20"]), float(r["p50"]), float(r["p80"])
            assert 0 < p20 <= p50 <= p80 and r["unit"] == "ms"
            assert float(r["gflops"]) > 0
    (dense,) = by_provider["dense"]
    assert dense["status"] == "ok" and float(dense["speedup_vs_dense"]) == 1.0
    for r in by_provider["reference"]:  # always available: measured, with its ratio to the dense row
        assert r["status"] == "ok"
        assert math.isclose(float(r["speedup_vs_dense"]), float(r["dense_p50"]) / float(r["p50"]), rel_tol=1e-3)
        assert 0.05 < float(r["density"]) < 0.2  # sparsity 0.9
    for r in by_provider["triton"] + by_provider["cuda"]:  # on a CPU run: listed, with the reason
        assert r["status"] == "skipped" and "CUDA" in r["reason"]
    md = (tmp_path / "smoke.md").read_text()
    assert "| linear |" in md and "reference" in md
    text = readme.read_text()
    assert text.startswith("# project\n\nkept text\n")
    assert text.count(README_START) == 1 and text.count(README_END) == 1
    assert "python -m sparsekern.bench --preset smoke" in text

    # regenerating from the CSV replaces the section instead of adding a second one
    assert main(["--from-csv", str(tmp_path / "smoke.csv"), "--readme", str(readme), "--no-plot"]) == 0
    again = readme.read_text()
    assert again.count(README_START) == 1 and again.startswith("# project\n\nkept text\n")


def test_update_readme_keeps_text_after_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{README_START}\nold\n{README_END}\ntail\n")
    update_readme(readme, "new table")
    assert readme.read_text() == f"head\n{README_START}\nnew table\n{README_END}\ntail\n"


def test_expand_puts_each_dense_baseline_before_its_cases():
    sel = Selection(
        ops=["linear", "conv2d", "rebuild"],
        providers=["dense", "reference", "cpp"],
        modes=["fwd", "fwd+bwd"],
        shapes=["tiny-linear", "tiny-conv"],
        sparsities=[0.5, 0.9],
        layouts=["unstructured", "block16"],
    )
    cases = expand(sel)
    seen_dense = set()
    for c in cases:
        if c.provider == "dense":
            seen_dense.add(c.dense_key())
        else:
            assert c.dense_key() in seen_dense, c.id
    assert len({c.id for c in cases}) == len(cases)
    assert {c.op for c in cases} == {"linear", "conv2d", "rebuild"}
    assert all(c.mode == "build" for c in cases if c.op == "rebuild")


def test_provider_restrictions_apply():
    sel = Selection(
        ops=["linear"], providers=["dense", "reference", "cpp"], modes=["fwd", "fwd+bwd"], shapes=["tiny-linear"],
        sparsities=[0.5, 0.9], provider_sparsities={"reference": [0.9]}, provider_modes={"reference": ["fwd+bwd"]},
    )  # fmt: skip
    ref = [c for c in expand(sel) if c.provider == "reference"]
    assert [(c.mode, c.sparsity) for c in ref] == [("fwd+bwd", 0.9)]


@pytest.mark.parametrize(
    "argv, name",
    [
        (["--ops", "matmul"], "--ops"),
        (["--layouts", "block7"], "--layouts"),
        (["--sparsity", "1.5"], "--sparsity"),
        (["--shapes", "nope"], "--shapes"),
        (["--batch", "x"], "--batch"),
    ],
)
def test_bad_arguments_name_the_argument(argv, name, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--list", *argv])
    msg = str(exc.value.code) + capsys.readouterr().err
    assert name in msg


def test_goal_table_matches_design_section_6():
    row = dict(provider="cpp", device="cpu", dtype="float32", mode="fwd+bwd", op="linear", layout="unstructured")
    assert goal_for({**row, "sparsity": "0.9"}).speedup == 5
    assert goal_for({**row, "sparsity": "0.95"}).speedup == 8
    assert goal_for({**row, "sparsity": "0.98"}).speedup == 15
    assert goal_for({**row, "sparsity": "0.75"}) is None
    assert goal_for({**row, "sparsity": "0.9", "provider": "reference"}) is None  # the spec has no speed goal
    assert goal_for({**row, "sparsity": "0.9", "layout": "block32"}).speedup == 6
    conv = {**row, "op": "conv2d", "family": "resnet18-cifar", "kernel": "3"}
    assert goal_for({**conv, "sparsity": "0.95"}).speedup == 5
    assert goal_for({**conv, "sparsity": "0.95", "kernel": "1"}) is None
    epoch = {**row, "op": "train_epoch", "mode": "train", "model": "resnet18"}
    assert goal_for({**epoch, "sparsity": "0.9"}).speedup == 2.5
    gpu = {**row, "device": "cuda", "provider": "triton", "dtype": "bfloat16", "layout": "block64", "sparsity": "0.9"}
    assert goal_for(gpu).speedup == 7
    assert goal_for({**gpu, "provider": "cpp"}) is None


def test_timing_percentiles_are_ordered():
    x = torch.randn(64, 64)
    t = time_cpu(lambda: x @ x, TimingConfig(threads=1, warmup=1, min_time=0.0, block_time=0.0, min_samples=5))
    assert t.samples == 5 and t.calls_per_sample >= 1
    assert 0 < t.p20 <= t.p50 <= t.p80


def test_compared_cases_are_timed_in_alternating_rounds():
    """A dense case and its sparse cases are timed round by round, not one after the other."""
    calls: list[str] = []
    fns = [lambda n=n: calls.append(n) for n in "abc"]
    cfg = TimingConfig(threads=1, warmup=1, min_time=0.0, block_time=0.0, min_samples=5, max_samples=5)
    times = time_cpu_rounds(fns, cfg, rounds=5)
    assert [t.samples for t in times] == [5, 5, 5]
    # after one warm-up call each; a timed block may call its callable more than once (the
    # Timer's own warm-up), so compare the sequence of blocks
    timed = [n for k, n in enumerate(calls[3:]) if k == 0 or calls[3 + k - 1] != n]
    assert len(timed) == 15
    for r in range(5):  # every round times every callable once, the order rotating
        assert sorted(timed[3 * r : 3 * r + 3]) == ["a", "b", "c"]
    assert timed[0] != timed[3]
    assert all(t.p20 <= t.p50 <= t.p80 for t in times)


@pytest.mark.parametrize("layout", ["unstructured", "block16"])
def test_rebuild_and_conv_cases_prepare(layout):
    conv = Case("conv2d", "reference", "fwd+bwd", TINY_CONV, 2, 0.9, layout, "float32", "cpu")
    prep = prepare(conv)
    dx, dw = prep.fn()
    assert dx.shape == (2, TINY_CONV.cin, TINY_CONV.hw, TINY_CONV.hw) and dw.shape == TINY_CONV.weight_shape
    rb = prepare(Case("rebuild", "formats", "build", TINY_CONV, 2, 0.9, layout, "float32", "cpu"))
    meta = rb.fn()
    meta.validate()
    assert rb.flops is None and 0 < rb.density <= 1  # tiny-conv is a single 16x16 tile when blocked
    assert isinstance(meta, BSRMeta) == (layout != "unstructured")


def test_torch_sparse_skips_conv_with_a_reason():
    with pytest.raises(Skip, match="conv2d"):
        prepare(Case("conv2d", "torch.sparse", "fwd", TINY_CONV, 2, 0.9, "unstructured", "float32", "cpu"))


@pytest.mark.parametrize("op", ["spmm", "sddmm"])
@pytest.mark.parametrize("provider", ["dense", "torch.sparse", "reference"])
def test_matmul_cases_compute_the_right_thing(op, provider):
    prep = prepare(Case(op, provider, "fwd", TINY_LINEAR, 16, 0.75, "unstructured", "float32", "cpu"))
    out = prep.fn()
    if out.layout != torch.strided:
        out = out.to_dense()
    rows = TINY_LINEAR.out_features if op == "sddmm" else 16
    cols = TINY_LINEAR.in_features if op == "sddmm" else TINY_LINEAR.out_features
    assert out.shape == (rows, cols) and torch.isfinite(out).all()
    assert prep.flops == pytest.approx(2 * 16 * prep.density * TINY_LINEAR.in_features * TINY_LINEAR.out_features)


def test_training_step_runs_dense_and_sparsified():
    dense = prepare(Case("train_step", "dense", "train", TINY_MODEL, 8, 0.0, "dense", "float32", "cpu"))
    sparse = prepare(Case("train_step", "reference", "train", TINY_MODEL, 8, 0.9, "unstructured", "float32", "cpu"))
    dense.fn()
    sparse.fn()
    assert dense.density == 1.0 and sparse.density < 0.5  # the classifier head stays dense
    assert 0 < sparse.flops < dense.flops


def _grid(cases, provider):
    return sorted((c.op, c.shape_name, c.batch, c.layout, round(c.sparsity, 2), c.dtype, c.mode)
                  for c in cases if c.provider == provider)  # fmt: skip


def test_cpu_kernels_preset_keeps_the_cpu_goal_cases():
    # what the former CPU kernel script timed: linear steps (no bias) and ResNet-18's 3x3 convs
    want = []
    for shape, batch in (("mlp-768x3072", 256), ("mlp-768x3072", 2048), ("mlp-4096x4096", 256)):
        want += [("spmm", shape, batch, "unstructured", s) for s in (0.9, 0.95, 0.98)]
        want += [("spmm", shape, batch, f"block{b}", 0.9) for b in (16, 32)]
    convs = ["r18c-l1", "r18c-l2-down", "r18c-l2", "r18c-l3-down", "r18c-l3", "r18c-l4-down", "r18c-l4"]
    for batch in (32, 128):
        for shape in convs:
            want += [("conv2d", shape, batch, "unstructured", s) for s in (0.9, 0.95)]
            if batch == 32:
                want += [("conv2d", shape, batch, f"block{b}", 0.9) for b in (16, 32)]
    cases = expand(PRESETS["cpu-kernels"])
    assert _grid(cases, "cpp") == sorted((*w, "float32", "fwd+bwd") for w in want)
    assert _grid(cases, "torch.sparse") == sorted((*w, "float32", "fwd+bwd") for w in want if w[0] == "spmm")
    assert {c.provider for c in cases} == {"dense", "cpp", "torch.sparse"} and PRESETS["cpu-kernels"].stem
    counts = {c.shape_name: c.shape.count for c in cases if c.op == "conv2d"}
    assert sum(counts.values()) == 16  # ResNet-18's 3x3 convs in the residual stages


def test_gpu_presets_keep_the_gpu_cases():
    lin = expand(PRESETS["gpu-linear"])
    tri = _grid(lin, "triton")
    assert tri == _grid(lin, "torch.sparse") and len(tri) == 4 * 5 * 5 * 4 * 3  # shapes, layouts, levels, dtypes, modes
    assert {t[3] for t in tri} == {"unstructured", "block16", "block32", "block64", "block128"}
    assert {t[5] for t in tri} == {"bfloat16", "float16", "float32", "tfloat32"} and {t[2] for t in tri} == {8192}
    assert all(c.device == "cuda" for c in lin) and all(c.op == "spmm" for c in lin)
    conv = expand(PRESETS["gpu-conv"])
    tri = _grid(conv, "triton")
    assert (
        len(tri) == 14 * 4 * 4 * 2
        and {t[2] for t in tri} == {128}
        and {c.provider for c in conv} == {"dense", "triton"}
    )
    assert {c.shape.hw for c in conv if c.shape_name.endswith("-l1")} == {32, 64}
    quick = _grid(expand(PRESETS["gpu-conv-quick"]), "triton")
    assert len(quick) == 14 and {(t[3], t[4], t[5]) for t in quick} == {("block64", 0.9, "bfloat16")}
    assert all(PRESETS[n].check for n in PRESETS if n.startswith("gpu-"))


def test_smoke_shapes_never_get_a_goal():
    row = dict(provider="cpp", device="cpu", dtype="float32", mode="fwd+bwd", op="linear", layout="unstructured",
               sparsity="0.9", status="ok", speedup_vs_dense="0.5")  # fmt: skip
    assert goal_fields({**row, "family": "mlp"}) == {
        "goal": goal_for({**row, "family": "mlp"}).label,
        "goal_met": "missed",
    }
    assert goal_for({**row, "family": "tiny"}) is None
    assert goal_fields({**row, "family": "tiny"}) == {"goal": "", "goal_met": "smoke, no goal"}
    assert goal_fields({**row, "family": "tiny", "provider": "reference"}) == {}
    assert goal_for({**row, "family": "mlp", "op": "spmm"}).speedup == 5  # a linear step without its bias


def _net_rows(provider="cpp", p50=1.0, dense=3.0, missing=None):
    layers = network_layers("resnet18-cifar")
    return [dict(op="conv2d", provider=provider, mode="fwd+bwd", shape=n, batch="32", layout="unstructured",
                 sparsity="0.9", dtype="float32", device="cpu", family="resnet18-cifar", kernel="3", status="ok",
                 p50=str(p50), dense_p50=str(dense)) for n in layers if n != missing]  # fmt: skip


def test_network_sums_and_torch_sparse_tables():
    lines = "\n".join(_network_lines(_net_rows()))
    assert "| resnet18-cifar | 32 | cpp | unstructured | 90 % | 48.0 | 16.0 | 3.00x | >= 3x | met |" in lines
    assert _network_lines(_net_rows(missing="r18c-l4")) == []  # only complete sets are summed
    a = dict(op="spmm", mode="fwd+bwd", shape="s", batch="8", layout="unstructured", sparsity="0.9",
             dtype="float32", device="cpu", status="ok")  # fmt: skip
    rows = [{**a, "provider": "cpp", "p50": "1.0"}, {**a, "provider": "torch.sparse", "p50": "2.5"}]
    assert "| spmm | fwd+bwd | float32 | cpp | CSR | 1 | 2.50x-2.50x | 2.50x |" in "\n".join(
        _vs_torch_sparse_lines(rows)
    )


def test_readme_keeps_one_part_per_csv(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n")
    for name in ("a", "b"):
        assert main(["--preset", "smoke", "--ops", "linear", "--providers", "dense,reference", "--layouts",
                     "unstructured", "--out", str(tmp_path), "--name", name, "--threads", "1", "--no-plot",
                     "--readme", str(readme)]) == 0  # fmt: skip
    text = readme.read_text()
    assert text.count(README_START) == 1 and "<!-- bench:csv a.csv -->" in text and "<!-- bench:csv b.csv -->" in text
    assert text.index("bench:csv a.csv") < text.index("bench:csv b.csv")
    assert [p.name for p in readme_csvs(readme)] == ["a.csv", "b.csv"]
    assert main(["--from-csv", str(tmp_path / "a.csv"), "--readme", str(readme), "--no-plot"]) == 0
    assert readme.read_text().count("<!-- bench:csv a.csv -->") == 1 and "bench:csv b.csv" in readme.read_text()
    (tmp_path / "b.csv").unlink()
    with pytest.raises(FileNotFoundError, match="b.csv"):
        write_readme(readme, [])


def test_torch_sparse_step_and_kernel_check():
    prep = prepare(Case("spmm", "torch.sparse", "fwd+bwd", TINY_LINEAR, 16, 0.75, "unstructured", "float32", "cpu"))
    y, dx, dw = prep.fn()
    assert y.shape == (16, TINY_LINEAR.out_features) and dx.shape == (16, TINY_LINEAR.in_features)
    assert dw.to_dense().shape == TINY_LINEAR.weight_shape
    if availability("cpp", "cpu")[0]:
        for case in (
            Case("linear", "cpp", "fwd+bwd", TINY_LINEAR, 16, 0.9, "block16", "float32", "cpu"),
            Case("conv2d", "cpp", "fwd+bwd", TINY_CONV, 2, 0.9, "unstructured", "float32", "cpu"),
        ):
            prep = prepare(case, check=True)
            assert prep.max_rel_err is not None and prep.max_rel_err < 1e-5
        assert prep.conv_algo.count("/") == 2 and set(prep.conv_algo.split("/")) <= {"direct", "gemm"}
    with pytest.raises(Skip, match="CUDA"):
        prepare(Case("linear", "dense", "fwd", TINY_LINEAR, 16, 0.0, "dense", "tfloat32", "cpu"))


def test_bf16_goals_are_against_the_fastest_dense():
    row = dict(provider="cpp-bf16", device="cpu", dtype="float32", mode="fwd+bwd", op="spmm", layout="unstructured",
               sparsity="0.95", status="ok", family="mlp", speedup_vs_dense="9", speedup_vs_dense_bf16="3",
               speedup_vs_fastest_dense="3", fastest_dense="dense-bf16")  # fmt: skip
    goal = goal_for(row)
    assert (goal.speedup, goal.baseline) == (4, "fastest")
    assert goal_fields(row)["goal_met"] == "missed"  # 3x over dense bf16; the 9x over fp32 does not count
    assert goal_for({**row, "layout": "block32", "sparsity": "0.9"}).speedup == 4
    epoch = {**row, "op": "train_epoch", "mode": "train", "model": "resnet18", "sparsity": "0.9"}
    assert goal_for(epoch).speedup == 1.5
    assert goal_for({**row, "provider": "auto-bf16"}) is None


def test_dense_bf16_is_a_second_baseline_and_the_bf16_preset_has_the_goal_cases():
    sel = Selection(ops=["linear", "train_epoch"], providers=["dense", "dense-bf16", "cpp-bf16", "auto-bf16"],
                    shapes=["tiny-linear", "tiny-model"], e2e_sparsities=[0.9])  # fmt: skip
    ids = [(c.op, c.provider) for c in expand(sel)]
    assert ids == [("linear", "dense"), ("linear", "dense-bf16"), ("linear", "cpp-bf16"),
                   ("train_epoch", "dense"), ("train_epoch", "dense-bf16"), ("train_epoch", "cpp-bf16"),
                   ("train_epoch", "auto-bf16")]  # fmt: skip
    cases = expand(PRESETS["bf16"])
    rows = [dict(provider=c.provider, device=c.device, dtype=c.dtype, mode=c.mode, op=c.op, layout=c.layout,
                 sparsity=str(c.sparsity), family=c.shape.family, kernel=str(getattr(c.shape, "kernel", "")),
                 model=getattr(c.shape, "model", "")) for c in cases]  # fmt: skip
    goals = {goal_for(r).text for r in rows if goal_for(r)}
    assert len(goals) == 7 and all("over the fastest dense" in g for g in goals)
    assert {c.provider for c in cases} == {"dense", "dense-bf16", "cpp-bf16", "auto-bf16"}


def test_network_sums_show_the_fastest_dense():
    rows = [{**r, "provider": "cpp-bf16", "dense_bf16_p50": "2.0", "fastest_dense": "dense-bf16"} for r in _net_rows()]
    lines = "\n".join(_network_lines(rows))
    assert (
        "| resnet18-cifar | 32 | cpp-bf16 | unstructured | 90 % | 48.0 | 16.0 | 3.00x | 32.0 | 2.00x | 2.00x |" in lines
    )
    assert ">= 2x" in lines and "| met |" in lines  # the bf16 conv goal, against the fastest dense summed
