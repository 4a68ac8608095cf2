"""Smoke tests of the benchmarks on tiny generated data: they run and print their JSON summary.

No timing is asserted here; the measured numbers live in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, write_aclimdb

# Each test runs a benchmark script in a process of its own (TensorFlow's import included).
pytestmark = pytest.mark.timeout(300)


def bench(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_aclimdb(tmp_path_factory.mktemp("bench") / "data", {"train": 60})


def sets() -> list[str]:
    return [arg for item in [*TINY, "train.epochs=1"] for arg in ("--set", item)]


def test_throughput_reports_medians_and_their_ratio(data: Path) -> None:
    out = bench("bench.throughput", "--data", str(data), "--max-len", "32", "--rounds", "1", *sets())
    medians = out["median_examples_per_s"]
    assert set(medians) == {"seed", "imdb_dist"} and all(v > 0 for v in medians.values())
    assert out["ratio"] == pytest.approx(medians["imdb_dist"] / medians["seed"])
    assert all(0.0 <= v <= 1.0 for v in out["val_accuracy_after"].values())


def test_pipeline_reports_its_rate_against_training(data: Path) -> None:
    out = bench("bench.pipeline", "--data", str(data), "--passes", "2", *sets())
    assert out["pipeline_examples_per_s_cached"] > 0 and out["training_examples_per_s"] > 0
    assert out["ratio_cached"] == pytest.approx(out["pipeline_examples_per_s_cached"] / out["training_examples_per_s"])


def test_accuracy_reports_curves_and_draws_the_plot(data: Path, tmp_path: Path) -> None:
    plot = tmp_path / "curve.png"
    out = bench("bench.accuracy", "--data", str(data), "--preset", "job/configs/fast.yaml", "--seed-max-len", "32",
                "--seed-epochs", "1", "--threshold", "0.5", "--plot", str(plot), *sets())
    results = out["results"]
    assert set(results) == {"imdb-dist fast", "seed-style max_len 32"}
    for result in results.values():
        assert result["curve"] and all(0.0 <= acc <= 1.0 for _, acc in result["curve"])
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_accuracy_cross_validates_over_folds_that_cover_the_data(data: Path) -> None:
    out = bench("bench.accuracy", "--data", str(data), "--preset", "job/configs/fast.yaml", "--seed-max-len", "32",
                "--seed-epochs", "1", "--folds", "2", *sets())
    assert out["folds"] == 2
    total = sum(len(list((data / "train" / label).iterdir())) for label in ("pos", "neg"))
    for result in out["results"].values():
        cv = result["cv"]
        assert cv["folds"] == 2 and len(cv["runs"]) == 2
        assert cv["mean"] == pytest.approx(sum(cv["accuracy"]) / 2)
        assert cv["std"] == pytest.approx(abs(cv["accuracy"][0] - cv["accuracy"][1]) / 2**0.5)
        # Each fold held out a different half: together, every training review once.
        assert sum(run["val_n"] for run in cv["runs"]) == total


def test_accuracy_refuses_a_single_fold(data: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.accuracy", "--data", str(data), "--folds", "1"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--folds must be 0" in proc.stderr


def test_serving_times_one_network_against_the_presets_ensemble(data: Path) -> None:
    out = bench("bench.serving", "--data", str(data), "--preset", "job/configs/best.yaml", "--reviews", "40",
                "--rounds", "1")
    rates = out["reviews_per_s_median"]
    assert set(rates) == {"1", "3"} and all(v > 0 for v in rates.values())
    assert out["ensemble_cost"] == pytest.approx(rates["1"] / rates["3"])


def test_coldstart_times_whole_processes_phase_by_phase_against_the_seeds_first_epoch(data: Path) -> None:
    out = bench("bench.coldstart", "--data", str(data), "--rounds", "1", *sets())
    medians = out["median"]
    assert set(medians) == {"current", "steady", "seed"}
    current = medians["current"]
    # Timed from outside, the process outlasts the phases it timed inside.
    assert current["process_wall_s"] >= sum(current["phases_s"].values()) - 0.05
    assert {"start-up", "data", "tokenize", "first_step", "steps", "export", "score"} <= set(current["phases_s"])
    assert len(out["runs"]["steady"][0]["epoch_examples_per_s"]) == 2  # one epoch more than the config
    assert out["first_epoch_over_seed_first_epoch"] == pytest.approx(
        current["first_epoch_examples_per_s"] / medians["seed"]["first_epoch_examples_per_s"]
    )
    steady = medians["steady"]
    assert out["first_epoch_over_steady_state"] == pytest.approx(
        steady["first_epoch_examples_per_s"] / steady["last_epoch_examples_per_s"]
    )
    assert all(0.0 <= m["val_accuracy"] <= 1.0 for m in medians.values())


def test_seed_baseline_runs_on_its_own(data: Path) -> None:
    out = bench("bench.seed", "--data", str(data), "--max-len", "32", "--epochs", "1")
    assert len(out["val_accuracy"]) == 1 and out["examples_per_s"][0] > 0


@pytest.mark.no_gpu
def test_gpu_benchmark_says_not_measured_without_a_gpu_and_runs_its_code_on_cpu() -> None:
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is present: run python -m bench.gpu for real")
    assert bench("bench.gpu")["status"].startswith("not measured")
    out = bench("bench.gpu", "--allow-cpu", "--steps", "2", "--batch", "8")
    assert out["examples_per_s"]["float32"] > 0 and out["examples_per_s"]["mixed_float16"] > 0


def test_step_reports_each_variants_cost_and_the_fast_dropout_speedup() -> None:
    out = bench("bench.step", "--batch", "8", "--length", "16", "--steps", "2", "--rounds", "1", "--precision", "float32")
    assert set(out["ms_per_step"]) == {"seed", "no_dropout", "no_lstm", "fast_dropout"}
    assert all(v > 0 for v in out["ms_per_step"].values())
    assert out["fast_dropout_speedup"] == pytest.approx(out["ms_per_step"]["seed"] / out["ms_per_step"]["fast_dropout"])


def test_scaling_step_times_both_routes_and_tabulates_traffic(data: Path) -> None:
    out = bench("bench.scaling", "step", "--data", str(data), "--batch", "8", "--batches", "2", "--max-len", "32",
                "--steps", "2", "--rounds", "1")
    assert set(out["ms_per_step"]) == {"step_sparse", "step_dense", "compute", "collective_sparse",
                                       "collective_dense"}
    assert all(ms > 0 for ms in out["ms_per_step"].values())
    assert [row["replicas"] for row in out["traffic_per_replica_and_step"]] == [2, 8, 16, 64]
    sparse = [row["sparse_sent_mb"] for row in out["traffic_per_replica_and_step"]]
    assert sparse == sorted(sparse) and sparse[0] < sparse[-1]  # gathering grows with the replicas
    # Both workers' collectives crossed loopback.
    assert out["loopback_mb_per_step_per_worker"]["collective_dense"] > 0


def test_scaling_threads_runs_each_setting_alone_and_in_pairs() -> None:
    out = bench("bench.scaling", "threads", "--settings", "1,1", "--batch", "8", "--length", "16", "--seconds", "1",
                "--rounds", "1")
    assert set(out["median"]["1,1"]) == {"alone", "two_processes_total", "two_over_one"}


@pytest.mark.ray
@pytest.mark.timeout(600)  # four imdb-dist launch processes, each with its own Ray cluster
def test_scaling_weak_launches_one_and_two_workers_and_a_pair_of_jobs(data: Path) -> None:
    out = bench("bench.scaling", "weak", "--data", str(data), "--batch", "8", "--max-len", "32", "--epochs", "1",
                "--rounds", "1", "--variants", "1,pair,2-dense")
    assert set(out["median"]) == {"1", "pair", "2-dense"}
    assert out["efficiency_2-dense"] > 0
    assert out["runs"]["2-dense"][0]["tf_threads"] == ["1"]
    # The pair is two separate jobs, summed: each ran and trained the same model.
    pair = out["runs"]["pair"][0]
    assert len(pair["jobs"]) == 2
    assert pair["steady_examples_per_s"] == pytest.approx(sum(job["steady_examples_per_s"] for job in pair["jobs"]))
    assert pair["jobs"][0]["val_accuracy"] == pair["jobs"][1]["val_accuracy"]
    assert out["pair_over_1"] > 0 and out["2-dense_over_pair"] > 0


def test_topology_runs_each_topology_and_compares_what_they_trained(data: Path) -> None:
    # The in-process topologies only (the Ray ones run the same measurement
    # through imdb-dist launch, covered by test_launch): one round, two epochs.
    out = bench("bench.topology", "--data", str(data), "--topologies", "1x1,1x2", "--rounds", "1", "--epochs", "2",
                *sets())
    assert set(out["median"]) == {"1x1", "1x2"}
    for name, replicas in (("1x1", 1), ("1x2", 2)):
        (run,) = out["runs"][name]
        assert run["replicas"] == replicas and run["first_epoch_examples_per_s"] > 0
        assert run["idle_per_epoch_s"] < run["run_wall_s"]
        assert 0.0 <= out["trained"][name]["val_accuracy"] <= 1.0
    assert out["trained"]["1x1"]["max_abs_score_diff_vs_1x1"] == 0.0
    assert out["trained"]["1x2"]["max_abs_score_diff_vs_1x1"] < 0.05  # the same batches, other summation order
    assert out["cpu"]["cpus"] >= 1


def test_loop_runs_this_tree_against_a_baseline_revision(data: Path) -> None:
    # HEAD as the baseline: a worktree of it is checked out, run and removed.
    out = bench("bench.loop", "--data", str(data), "--epochs", "2", "--rounds", "1", "--baseline", "HEAD",
                "--variants", "current,baseline")
    assert set(out["median"]) == {"current", "baseline"}
    assert all(run["val_accuracy"] >= 0 for runs in out["runs"].values() for run in runs)
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True, check=True)
    assert len(worktrees.stdout.splitlines()) == 1  # the baseline's checkout is gone
