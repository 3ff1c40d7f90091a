"""The benchmark scripts run end to end (tiniest settings) and end with one JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mwt_core.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]

QUALITY_KEYS = {
    "standard_acc", "mwt_acc", "krr", "cohesion", "coupling",
    "tc01_krr", "tc01_std_acc", "tc01_zero_acc", "tc01_ft_acc",
    "tc358_krr", "tc358_std_acc", "tc358_zero_acc", "tc358_ft_acc",
    "standard_s", "mwt_s",
}
SPEED_KEYS = {
    "std_img_s", "mwt_img_s", "mwt_over_std", "modularize_s",
    "module1_latency_ratio", "module3_latency_ratio", "module1_flops_ratio", "module3_flops_ratio",
    "module1_padded_latency_ratio", "module1_padded_flops_ratio", "projected_200ep_min",
}


def _last_json_line(script: str, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, "no output"
    return json.loads(lines[-1])


@pytest.mark.slow
def test_quality_bench_tiny():
    r = _last_json_line("quality.py", "--epochs", "1", "--width", "0.125", "--finetune-epochs", "1",
                        "--train-limit", "200", "--device", "cpu")
    assert set(r) >= QUALITY_KEYS
    for key in QUALITY_KEYS - {"standard_s", "mwt_s"}:
        assert 0.0 <= r[key] <= 1.0, key
    assert r["standard_s"] > 0 and r["mwt_s"] > 0 and r["eval_split"] == "test"
    # TrainConfig's defaults, kernel budget included, whatever the data set
    assert r["target_krr"] == TrainConfig.target_krr and r["alpha"] == TrainConfig.alpha
    assert r["kernel_budget"]["target_krr"] == TrainConfig.target_krr and 0 <= r["mwt_val_acc"] <= 1


@pytest.mark.slow
def test_quality_bench_can_choose_on_a_holdout_of_train():
    r = _last_json_line("quality.py", "--epochs", "1", "--width", "0.125", "--finetune-epochs", "1",
                        "--holdout", "0.2", "--device", "cpu")
    assert r["eval_split"] == "holdout 0.2 of train" and r["num_train"] == 1149


def test_speed_bench_tiny():
    r = _last_json_line("speed.py", "--width", "0.125", "--train-size", "256", "--test-size", "32",
                        "--modularize-size", "512", "--latency-batch", "16", "--no-warmup",
                        "--gamma", "0.5", "--device", "cpu")
    assert set(r) >= SPEED_KEYS and r["gamma"] == 0.5
    for key in SPEED_KEYS:
        assert r[key] > 0, key
    for key in ("module1_flops_ratio", "module3_flops_ratio"):
        assert r[key] <= 1.0 + 1e-9, key
        # Padding to whole multiples of 8 channels only adds (zeroed) channels.
        assert r[key] <= r[key.replace("_flops", "_padded_flops")] <= 1.0 + 1e-9, key
    assert 0 < r["module1_krr"] <= r["module3_krr"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("script", ["quality.py", "speed.py"])
def test_bench_rejects_unknown_arch(script):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--arch", "nonet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: unknown architecture")
    assert proc.stdout == ""


@pytest.mark.slow
def test_compose_bench_tiny():
    """bench/compose.py end to end on tiny models: every key, one row per seed x split x method."""
    r = _last_json_line("compose.py", "--epochs", "1", "--width", "0.125", "--train-limit", "300",
                        "--seeds", "0", "--methods", "raw", "head", "--holdout", "0.2",
                        "--timing-repeats", "1", "--max-epochs", "3")
    keys = {"single_acc", "best_method", "zero_label_best_method", "samples_per_class",
            "compose_p50_s"} | {f"{s}_{m}_acc" for s in ("halves", "thirds", "pairs")
                                for m in ("raw", "head")}
    assert set(r) >= keys and r["eval_split"] == "holdout 0.2 of train"
    assert r["best_method"] in ("raw", "head") and r["zero_label_best_method"] == "raw"
    assert len(r["rows"]) == 3 * 2 and r["samples_per_class"] == 20 and r["compose_p50_s"] > 0
    head = [row for row in r["rows"] if row["method"] == "head"]
    assert all(0 < row["labelled"] <= 200 and row["combine_params"] > 0 for row in head)
    # --budget steps (default): fewer images per model, more epochs (the single model's steps).
    epochs = {row["split"]: row["sources_epochs"] for row in head}
    # (--budget epochs would give 1 everywhere; pairs' 5 is capped by --max-epochs 3)
    assert set(epochs["pairs"]) == {3} and all(1 < e <= 3 for e in epochs["halves"])
    assert len(r["compose_wall_s"]) == 1 and r["compose_cpu_p50_s"] > 0


@pytest.mark.slow
def test_archs_bench_tiny():
    r = _last_json_line("archs.py", "--archs", "tv_mobilenet_v3_small,tv_regnet_y_400mf", "--epochs", "1",
                        "--train-limit", "64", "--batch", "8", "--steps", "1", "--device", "cpu")
    assert set(r["archs"]) == {"tv_mobilenet_v3_small", "tv_regnet_y_400mf"}
    for a in r["archs"].values():
        assert a["slim_max_diff"] < 1e-5 and a["static_max_diff"] < 1e-5
        assert a["params"] > a["plain_params"] > 0 and a["flops"] > a["plain_flops"] > 0
        assert a["convert_s"] > 0 and a["step_s"] > 0 and a["masked_units"] > 0
        assert 0 <= a["mwt_acc"] <= 1 and 0 < a["krr"] <= 1
        for key in ("module1", "module3"):
            assert 0 < a[f"{key}_flops_ratio"] <= 1 + 1e-9 and a[f"{key}_latency_ratio"] > 0


@pytest.mark.slow
def test_archs_bench_init_study_tiny():
    r = _last_json_line("archs.py", "--archs", "none", "--init-study", "1", "--train-limit", "32",
                        "--batch", "16", "--device", "cpu")
    s = r["init_study"]
    assert r["archs"] == {} and s["scratch_epochs"] == s["std_epochs"] + s["init_epochs"]
    assert s["settings"] == "default"
    for key in ("std", "init", "scratch"):
        assert 0 <= s[f"{key}_acc"] <= 1 and s[f"{key}_s"] > 0
    for key in ("init", "scratch"):
        assert 0 < s[f"{key}_krr"] <= 1 and 0 <= s[f"{key}_coupling"] <= 1


@pytest.mark.slow
def test_registry_load_bench_tiny():
    # wrk comes from scripts/system-deps.sh (make test, .ci/run); the figures are the bench's.
    r = _last_json_line("registry_load.py", "--duration", "1", "--warmup", "0", "--models", "1",
                        "--connections", "4", "--threads", "1")
    assert set(r["runs"]) == {"1", "0"}
    for fig in r["runs"].values():
        assert fig["req_per_s"] > 0 and fig["non_2xx"] == 0 and fig["p50_ms"] <= fig["p99_ms"]


@pytest.mark.slow
def test_modules_bench_tiny(tmp_path):
    """bench/modules.py end to end on a one-epoch model: every network timed, and the blocked
    FLOPs add exactly the rounded-up output channels (none for the model at --block 4, whose
    widths are multiples of 4; some for modules cut to other counts). With --every-class each
    class's 1-class modules are timed too, class 0's being the main table's, and counted
    against the targets."""
    r = _last_json_line("modules.py", "--epochs", "1", "--width", "0.125", "--batch", "8",
                        "--rounds", "1", "--block", "4", "--every-class", "--model-dir", str(tmp_path / "m"))
    nets = {"model_nchw", "model", "module1_gen", "module1_static", "module3_gen", "module3_static",
            "compose3_gen"}
    assert set(r["batches"]["8"]) == nets and r["block"] == 4
    assert r["blocked_flops"]["model"] == r["flops"]["model"]
    assert all(r["blocked_flops"][k] >= r["flops"][k] for k in nets)
    assert any(r["blocked_flops"][k] > r["flops"][k] for k in nets)
    assert all(row["latency_s"] > 0 for row in r["batches"]["8"].values())
    assert (tmp_path / "m" / "manifest.json").is_file()
    every = r["every_class"]["8"]
    assert set(every) == {"module1_gen", "module1_static"} | {
        f"class{c}_{k}" for c in range(1, 10) for k in ("gen", "static")}
    assert every["module1_gen"] == r["batches"]["8"]["module1_gen"]
    assert all(row["latency_s"] > 0 and 0 < row["flops_ratio"] < 1 for row in every.values())
    targets = r["targets"]
    assert targets["classes"] == 10
    assert targets["classes_gen_le_0.7"] == sum(every[k]["latency_ratio"] <= 0.7 for k in every if k.endswith("gen"))


@pytest.mark.slow
def test_soak_bench_tiny(tmp_path):
    """bench/soak.py for a few seconds on the embedded stack, its job on 512 images: the JSON
    line has every figure, each checked download and export matched its sha256, the job's
    process was killed after a checkpoint before its last epoch and the job resumed from that
    checkpoint, and the table went to --results. (Four epochs: with two, the last epoch of a
    tiny job could end between two of the bench's polls, and nothing was left to kill.)"""
    results = tmp_path / "soak.md"
    epochs = 4
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", "15", "--clients", "4",
         "--epochs", str(epochs), "--job-train-images", "512", "--job-timeout", "400",
         "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=580,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["bench"] == "soak" and r["stack"] == "embedded" and r["clients"] == 4
    assert set(r["kinds"]) == {"query", "download", "predict", "export", "compose", "job"}
    for k in r["kinds"].values():
        assert k["requests"] == sum(k["by_status"].values())
    assert r["requests"] == sum(k["requests"] for k in r["kinds"].values()) > 0
    assert r["checksum_checks"] > 0 and r["checksum_mismatches"] == 0, r["mismatch_samples"]
    assert r["api"]["peak_rss_mb"] >= r["api"]["start_rss_mb"] > 0 and r["api"]["alive_at_end"]
    job = r["job"]
    killed_at = job["killed"]["checkpoint_epoch"]
    assert 1 <= killed_at < epochs and job["killed"]["pid"] > 0, job
    # From that checkpoint, or the next one where the epoch ended between the poll and the kill.
    assert job["succeeded"] and job["resumed"], job
    assert killed_at <= job["resumed_from_epoch"] < epochs, job
    assert isinstance(r["ok"], bool) and results.read_text().startswith("# bench/soak.py")


@pytest.mark.slow
def test_modularity_bench_tiny(tmp_path):
    results = tmp_path / "modularity.md"
    r = _last_json_line("modularity.py", "--datasets", "digits", "--epochs", "1", "--seeds", "0",
                        "--width", "0.125", "--train-limit", "300", "--device", "cpu",
                        "--results", str(results))
    keys = ("std_acc", "acc", "krr", "coupling", "module1_params", "module3_params",
            "module3_acc_gap", "train_s_ratio")
    assert {f"digits_{k}" for k in keys} <= set(r)
    assert {(row["variant"], row["seed"]) for row in r["runs"]} == {
        ("standard", 0), ("paper", 0), ("default", 0)}
    for key in ("krr", "coupling", "module1_params", "module3_params"):
        assert 0.0 < r[f"digits_{key}"] <= 1.0, key
    assert r["digits_train_s_ratio"] > 0
    assert "Means over seeds" in results.read_text()
