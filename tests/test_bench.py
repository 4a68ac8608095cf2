"""Smoke tests of the benchmarks on tiny generated data: they run and print their JSON summary.

No timing is asserted here; the measured numbers live in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, write_aclimdb

# Each test runs a benchmark script in a process of its own (TensorFlow's import included).
pytestmark = pytest.mark.timeout(300)


def bench(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_aclimdb(tmp_path_factory.mktemp("bench") / "data", {"train": 60})


def sets() -> list[str]:
    return [arg for item in [*TINY, "train.epochs=1"] for arg in ("--set", item)]


def test_a_benchmark_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    # bench/harness.py's parser, which every benchmark uses: no usage dump, no traceback
    # minutes in, nothing on stdout (where the JSON summary goes), exit status 2.
    for args, says in (
        (["weak", "--data", str(tmp_path / "missing")], "no such file or directory"),
        (["weak", "--data", str(tmp_path), "--variants", "1,3-dense"], "unknown variant(s) 3-dense"),
        (["threads", "--rounds", "0"], "must be at least 1"),
    ):
        proc = subprocess.run([sys.executable, "-m", "bench.scaling", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 2 and proc.stdout == "", (args, proc.stderr[-3000:])
        (line,) = proc.stderr.splitlines()
        assert line.startswith("error: ") and says in line, (args, line)


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


def test_accuracy_cross_validates_over_folds_that_cover_the_data_and_draws_the_curves(data: Path, tmp_path: Path) -> None:
    plot = tmp_path / "curve.png"
    out = bench("bench.accuracy", "--data", str(data), "--preset", "job/configs/fast.yaml", "--seed-max-len", "32",
                "--seed-epochs", "1", "--folds", "2", "--threshold", "0.5", "--plot", str(plot), *sets())
    assert out["folds"] == 2
    results = out["results"]
    assert set(results) == {"imdb-dist fast", "seed-style max_len 32"}
    total = sum(len(list((data / "train" / label).iterdir())) for label in ("pos", "neg"))
    for result in results.values():
        cv = result["cv"]
        assert cv["folds"] == 2 and len(cv["runs"]) == 2
        # The generated data has no urls files: folds share movies, and the margin is stated.
        assert (cv["grouped_by_movie"], cv["margin"]) == (False, 0.02)
        assert cv["mean"] == pytest.approx(sum(cv["accuracy"]) / 2)
        assert cv["std"] == pytest.approx(abs(cv["accuracy"][0] - cv["accuracy"][1]) / 2**0.5)
        # Each fold held out a different half: together, every training review once.
        assert sum(run["val_n"] for run in cv["runs"]) == total
        for run in cv["runs"]:  # the curves, per fold; the result's own is fold 0's, which the plot draws
            assert run["curve"] and all(0.0 <= acc <= 1.0 for _, acc in run["curve"])
        assert result["curve"] == cv["runs"][0]["curve"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_accuracy_refuses_a_single_fold(data: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.accuracy", "--data", str(data), "--folds", "1"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "--folds must be 0" in proc.stderr


def test_serving_times_one_network_against_the_presets_ensemble(data: Path) -> None:
    out = bench("bench.serving", "--data", str(data), "--preset", "job/configs/best.yaml", "--reviews", "40",
                "--rounds", "1")
    rates = out["reviews_per_s_median"]
    assert set(rates) == {"1", "3"} and all(v > 0 for v in rates.values())
    assert out["ensemble_cost"] == pytest.approx(rates["1"] / rates["3"])


def test_coldstart_times_whole_processes_phase_by_phase_against_the_seeds_first_epoch(data: Path) -> None:
    out = bench("bench.coldstart", "--data", str(data), "--rounds", "1", "--seed-settings", *sets())
    medians = out["median"]
    assert set(medians) == {"current", "steady", "seed", "seed-settings"}
    # The seed's own settings: 2 epochs; the ratio docs/training.md quotes for fast.yaml.
    assert len(out["runs"]["seed-settings"][0]["epoch_examples_per_s"]) == 2
    assert out["current_over_seed_settings"] == pytest.approx(
        medians["current"]["process_wall_s"] / medians["seed-settings"]["process_wall_s"]
    )
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


def test_uploads_reads_the_bytes_of_every_checkpoint_back_from_the_bucket(data: Path) -> None:
    summary = bench("bench.uploads", "--data", str(data), "--epochs", "2", *sets())
    assert [c["epoch"] for c in summary["per_checkpoint"]] == [1, 2]
    for sync in summary["per_checkpoint"]:
        assert sync["checkpoint_bytes"] > 0 and sync["bytes"] > sync["checkpoint_bytes"]
        assert sync["logs_size_bytes"] > 0
    assert summary["logs_second_to_last_ratio"] > 0 and summary["machine"]


def test_seed_baseline_runs_on_its_own(data: Path) -> None:
    out = bench("bench.seed", "--data", str(data), "--max-len", "32", "--epochs", "1")
    assert len(out["val_accuracy"]) == 1 and out["examples_per_s"][0] > 0


@pytest.mark.no_gpu
def test_gpu_benchmark_without_a_gpu_says_why_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is present: run python -m bench.gpu for real")
    output = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--output", str(output)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # One line, TensorFlow's start-up chatter filtered out, naming a reason.
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: no GPU visible to TensorFlow: ") and len(line) > 40, line
    assert proc.stdout == "" and not output.exists()


@pytest.mark.no_gpu
def test_gpu_benchmark_rehearses_every_part_of_the_real_job_on_cpu(data: Path, tmp_path: Path) -> None:
    # Six processes of the real job on the tiny model and data (about 90 s here):
    # a warm-up, float32, mixed, all devices, and the deterministic runs in two
    # (uninterrupted and stopped, then resumed in a fresh one).
    output = tmp_path / "rehearsal.json"
    out = bench("bench.gpu", "--cpu-rehearsal", "--data", str(data), "--epochs", "2", "--batch", "16", "--max-len", "32",
                "--output", str(output), *[arg for item in TINY if "batch_size" not in item and "max_len" not in item
                                           for arg in ("--set", item)])
    assert json.loads(output.read_text()) == out
    assert out["status"] == "cpu rehearsal: code path check, not GPU figures" and "errors" not in out
    assert out["devices"]["gpus"] == [] and out["devices"]["nvidia_smi"].startswith("not applicable")
    assert out["devices"]["build"] and out["devices"]["cpu"]["cpus"] >= 1
    assert out["reviews_per_class"] == 60  # the fixture's: fewer than the rehearsal's default subset
    assert out["warm_up"]["runs"] == ["warm-up float32", "warm-up mixed_float16"]
    # float32 against the mixed run on one device, from the runs' metrics.jsonl and report.json.
    precision = out["precision"]
    for name, run in (("float32", precision["float32"]), ("mixed", precision["mixed"])):
        assert run["replicas"] == 1 and run["epochs"] == 2 and run["global_batch"] == 16, name
        assert run["first_epoch_examples_per_s"] > 0 and run["steady_examples_per_s"] > 0, name
        assert 0 < run["run_wall_s"] < run["process_s"], name
    assert precision["float32"]["precision"] == "float32"
    assert precision["mixed"]["precision_asked"] == "mixed_float16"
    assert precision["mixed"]["precision"] in ("mixed_float16", "mixed_bfloat16")  # one CPU refuses float16
    assert precision["mixed_speedup"]["steady_examples_per_s"] == pytest.approx(
        precision["mixed"]["steady_examples_per_s"] / precision["float32"]["steady_examples_per_s"])
    # MirroredStrategy over two logical CPUs stands in for every GPU, at the same batch per device.
    every = out["all_devices"]
    assert every["all"]["replicas"] == 2 and every["all"]["strategy"] == "MirroredStrategy"
    assert every["all"]["global_batch"] == 32 and every["all"]["steady_examples_per_s"] > 0
    assert every["speedup_over_one"]["steady_examples_per_s"] > 0
    # No NCCL on CPUs: said so, and the all-reduce the job logged instead.
    nccl = out["nccl"]
    assert nccl["status"].startswith("not applicable") and nccl["nccl_info_lines"] == 0
    assert nccl["configured"]["all_reduce_logged"]
    # The LSTM's kernel as the layer reported it at run time: the generic one on a CPU.
    lstm = out["lstm"]
    assert lstm["runtime"] == 1 and lstm["cudnn"] is False
    for name, probe in lstm["by_run"].items():
        assert probe["runtime"] in (1, 2) and probe["max_abs_diff_vs_job_layer"] == 0.0, name
    assert lstm["by_run"]["all_devices"]["per_replica"] == [1, 1]
    assert lstm["by_run"]["mixed"]["compute_dtype"] == precision["mixed"]["precision"].removeprefix("mixed_")
    # Stopped half-way through epoch 2 and resumed in a fresh process: the same weights, or the op refused.
    resume = out["exact_resume"]
    assert resume["stop"] == {"epoch": 2, "step": 3, "steps_per_epoch": 6}
    if resume["exact"] is None:
        assert resume["refused_op"]["message"]
    else:
        assert resume["exact"] is True and resume["tensors"] >= 5 and resume["max_abs_diff"] == 0.0
        assert "stopped by SIGTERM at epoch 2 step 3" in resume["interrupted"]
        assert resume["optimizer_steps"]["uninterrupted"] == resume["optimizer_steps"]["stopped_and_resumed"] == 12


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
@pytest.mark.timeout(600)  # two imdb-dist launch processes at once, each with its own Ray cluster
def test_scaling_weak_launches_a_pair_of_jobs_and_sums_them(data: Path) -> None:
    # The pair is two 1-worker jobs at once (the "1" variant's launch, twice): the one variant
    # that is more than a launch with other settings (those reach the workers: test_launch.py).
    out = bench("bench.scaling", "weak", "--data", str(data), "--batch", "8", "--max-len", "32", "--epochs", "1",
                "--rounds", "1", "--variants", "pair")
    assert set(out["median"]) == {"pair"} and out["cpu"]["model"] and out["cpu"]["cpus"] == os.cpu_count()
    # Two separate jobs, summed: each ran and trained the same model, on one thread per pool.
    pair = out["runs"]["pair"][0]
    assert len(pair["jobs"]) == 2
    assert pair["steady_examples_per_s"] == pytest.approx(sum(job["steady_examples_per_s"] for job in pair["jobs"]))
    assert pair["jobs"][0]["val_accuracy"] == pair["jobs"][1]["val_accuracy"]
    assert pair["jobs"][0]["tf_threads"] == pair["jobs"][1]["tf_threads"] == ["1"]
    assert pair["wall_s"] == max(job["wall_s"] for job in pair["jobs"])


def test_transport_error_compares_a_bfloat16_sum_of_real_gradients_with_float32(data: Path) -> None:
    out = bench("bench.scaling", "transport-error", "--data", str(data), "--batch", "8", "--max-len", "32",
                "--replicas", "2,4")
    assert set(out["replicas"]) == {"2", "4"} and out["cpu"]["model"]
    for result in out["replicas"].values():
        assert result["rows_touched"] > 0
        # Rounded to 8 significant bits: an error, and a small one.
        assert 0 < result["relative_l2_error"] < 0.05 and 0 <= result["sign_flips_share"] < 0.05


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


def test_checkpoint_pace_launches_a_variant_and_reads_its_phases(data: Path) -> None:
    # One launch: every-2 alone (the baseline, epoch-ends, is the same launch without step
    # checkpoints; every-N-poll-S is every-N with another ray.report_poll_s, whose reaching the
    # controller test_launch.py shows).
    out = bench("bench.checkpoint_pace", "--data", str(data), "--every", "2", "--poll", "2", "--rounds", "1", *sets(),
                "--set", "ray.num_shards=2", "--variants", "every-2")
    (run,) = out["runs"]["every-2"]
    # The run trained its epoch, and Ray Train kept a checkpoint every 2 steps and the epoch's
    # end (the last step is the epoch's end).
    steps = run["optimizer_steps"] // run["epochs"]
    assert steps > 2 and run["examples_per_s_median"] > 0 and run["checkpoints_s"] > 0
    assert run["checkpoints"] == run["epochs"] * (1 + (steps - 1) // 2), run
    assert set(out["runs"]) == {"every-2"} and out["speed_vs_epoch_ends"] is None  # no baseline ran
    assert out["cpu"]["model"] and out["cpu"]["cpus"] == os.cpu_count()


def test_digest_times_the_step_with_and_without_the_batch_digest() -> None:
    out = bench("bench.digest", *[arg for item in TINY for arg in ("--set", item)], "--width", "32", "--steps", "2",
                "--rounds", "1")
    assert set(out["median_step_cpu_ms"]) == {"no_digest", "digest"}
    assert all(ms > 0 for ms in out["median_step_ms"].values()) and out["rows_sum_alone_ms"] > 0
    assert out["digest_cpu_share"] == pytest.approx(
        out["median_step_cpu_ms"]["digest"] / out["median_step_cpu_ms"]["no_digest"] - 1)


def test_tracking_runs_the_job_with_and_without_mlflow_side_by_side(data: Path) -> None:
    # One round of each: the tracked run logged every step point to the benchmark's own server.
    out = bench("bench.tracking", "--data", str(data), "--every", "2", "--rounds", "1", *sets(),
                "--set", "train.epochs=2")
    (off,), (on,) = out["runs"]["off"], out["runs"]["on"]
    assert "logged_step_points" not in off
    assert on["logged_step_points"] == on["step_points"] == off["step_points"] > 0
    assert on["mlflow_status"] == "FINISHED" and on["optimizer_steps"] == off["optimizer_steps"]
    assert out["on_vs_off"]["wall_s"] == pytest.approx(on["wall_s"] / off["wall_s"])
    assert out["cpu"]["model"] and out["cpu"]["cpus"] == os.cpu_count()
