"""``bench --quick`` runs end to end and writes well-formed tables and plots (timings are not asserted)."""
import csv

import pytest

from bench import run_all

EXPECTED = {
    "kernels": {"dtype", "layer", "tokens", "rule", "variant", "median_ms", "iqr_ms", "peak_MiB"},
    "step": {"model", "method", "clip_norm", "median_ms", "params_MiB", "grads_MiB", "optimizer_state_MiB",
             "activations_MiB", "temporaries_MiB", "tracked_peak_MiB", "profiled_peak_MiB"},
    "memory_plan": {"model", "method", "params", "grads", "optimizer_state", "activations", "total_gib",
                    "paper_gib", "vs_paper"},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_results")
    assert run_all.main(["--quick", "--out", str(out)]) == 0
    return out


def _markdown_table(path):
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[1], cells[2:]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_quick_bench_writes_well_formed_tables(results, name):
    header, rule, body = _markdown_table(results / f"{name}.md")
    assert EXPECTED[name] <= set(header)
    assert all(c == "---" for c in rule) and len(rule) == len(header)
    assert body and all(len(row) == len(header) and all(row[:3]) for row in body)
    with open(results / f"{name}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == header and len(rows) == len(body)
    assert "Device:" in (results / f"{name}.md").read_text()
    assert (results / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_bench_numbers_are_sane(results):
    with open(results / "kernels.csv", newline="") as f:
        kernels = list(csv.DictReader(f))
    for row in kernels:
        assert float(row["median_ms"]) > 0
        if row["variant"] in ("hook", "matmul"):  # they hold a weight-sized gradient
            assert float(row["peak_MiB"]) >= float(row["weight_MiB"])
        if row["variant"] == "hook" and row["dtype"] == "bfloat16":  # + fp32 copies of gradient and weight
            assert float(row["peak_MiB"]) >= 4 * float(row["weight_MiB"])
    assert any(r["variant"].startswith("fused[") for r in kernels)
    assert {r["dtype"] for r in kernels} == {"float32", "bfloat16"}
    with open(results / "step.csv", newline="") as f:
        steps = {(r["model"], r["method"]): r for r in csv.DictReader(f)}
    for model in ("llama-weights", "gpt2-activations"):
        assert float(steps[(model, "adamw")]["optimizer_state_MiB"]) > 0
        assert float(steps[(model, "lomo")]["grads_MiB"]) == 0  # the fused step never holds a weight gradient
    with open(results / "memory_plan.csv", newline="") as f:
        plans = list(csv.DictReader(f))
    assert {r["method"] for r in plans} >= {"torch-adamw", "sgd", "lomo-optim"}
    for r in plans:
        assert abs(float(r["total_gib"]) / float(r["paper_gib"]) - 1) < 0.03


def test_quick_bench_writes_the_readme_headline(results):
    lines = (results / "headline.md").read_text().splitlines()
    assert sum(line.startswith("|---") for line in lines) == 2
    assert any(line.startswith("| llama-7b | torch-adamw |") for line in lines)
    assert any(line.startswith("| lomo |") for line in lines)
