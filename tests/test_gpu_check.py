"""bench/gpu_check.py, the prepared GPU run, on tiny stand-ins on the CPU: every step must run, so it cannot rot."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.skipif(not (SHARED / "golden").is_dir() or not (SHARED / "reference" / "official").is_dir(),
                    reason="the golden cases and the original code live in ../shared")
def test_every_step_runs_on_tiny_stand_ins(tmp_path):
    command = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--out_dir", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == 0 and report["tiny"] and report["device"] == "cpu"
    checks = report["checks"]
    assert {c["step"] for c in checks} == {"1", "2", "3", "4", "5", "6"}
    printed = [line for line in proc.stdout.splitlines() if line.startswith("[") and "]" in line and ": " in line
               and line.split("] ", 1)[1][:4] in ("ok  ", "FAIL", "skip")]
    assert len(printed) == len(checks)  # one line per check, as it goes
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(checks) + 1
    by_name = {c["check"]: c for c in checks}
    assert by_name["flow invariants (tests/test_flow.py on cpu, float32)"]["passed"] > 0
    assert all(c["calls"] > 0 and c["seconds"] > 0 for c in checks if c["check"].startswith("3B ours"))
    compiled = by_name["3B ours, sequential, compiled"]
    assert compiled["ratio_to_eager"] > 0 and compiled["first_decode_seconds"] > 0
    original = [c for c in checks if c["check"].startswith("3B original")]
    assert len(original) == 2 and all(c["ratio_ours_over_original"] > 0 for c in original)
    assert all(c["batch"] == 4 for c in checks if c["step"] == "4")  # the --tiny cap
    assert (tmp_path / "demo_bf16_vs_fp32.png").stat().st_size > 0
    inversion = {c["check"]: c["errors"] for c in checks if c["step"] == "6"}
    assert {e["largest"] for e in inversion["inversion on cpu, float32"].values()} == {0}


def test_batch_search_finds_the_edge():
    from gpu_check import largest_batch

    def memory(limit, per_sample=1.7, fixed=10.0):
        """A device with room for `limit` bytes whose micro step peaks at fixed + per_sample x batch."""
        return lambda b: fixed + per_sample * b if fixed + per_sample * b <= limit else None

    assert largest_batch(memory(100.0), 100.0, 512) == (52, 53)
    assert largest_batch(memory(100.0), 100.0, 40) == (40, None)
    # a guess from misleading small batches (memory grows faster later) still ends on the edge
    steep = lambda b: (10.0 + 1.7 * b + 0.05 * max(0, b - 4) ** 2) if 10.0 + 1.7 * b + 0.05 * max(0, b - 4) ** 2 \
        <= 100.0 else None  # noqa: E731
    good, bad = largest_batch(steep, 100.0, 512)
    assert steep(good) is not None and (bad is None or steep(bad) is None) and bad - good <= 2
    assert largest_batch(memory(100.0), None, 4) == (4, None)


def test_training_search_recovers_from_out_of_memory(tmp_path, monkeypatch):
    """A step that runs out of memory is released, the edge is found below it, and the batch is timed on a fresh
    run (FSDP2 in a one-rank gloo group, as on the GPU with NCCL)."""
    import gpu_check

    step = gpu_check.SyntheticRun.optimizer_step

    def limited(run, micro_batches, first_index):
        if len(micro_batches[0][0]) > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return step(run, micro_batches, first_index)

    monkeypatch.setattr(gpu_check.SyntheticRun, "optimizer_step", limited)
    args = SimpleNamespace(tiny=True, device="cpu", out_dir=str(tmp_path), assets=None, max_batch=6, train_steps=1)
    ctx = gpu_check.Context(args)
    report = gpu_check.Report(tmp_path, dict(device="cpu", device_name="cpu", tiny=True, torch=torch.__version__,
                                             date="today", steps="4"))
    with gpu_check.one_rank_group(ctx.device):
        gpu_check.train_setting(ctx, report, checkpointing=0)
    row = report.rows[-1]
    assert row["ok"] and row["batch"] == 5 and row["first_batch_not_fitting"] == 6
    assert "FSDP2" in row["check"] and row["images_per_second"] > 0
