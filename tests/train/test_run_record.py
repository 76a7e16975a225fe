"""summary.json segments across kills and reruns; the fault-injection spec parser."""
import json

import pytest

from moe_jax.train import faults, run_record


def _segment(start, end, status="running"):
  return {"start_step": start, "end_step": end, "status": status,
          "train_history": [{"step": s} for s in range(start + 2, end + 1, 2)]}


def test_a_rerun_cuts_back_the_segments_it_redoes(tmp_path):
  workdir = str(tmp_path)
  run_record.write_summary(workdir, _segment(0, 6, "stopped by SIGTERM"), {})
  # killed at 10 with checkpoint 8 uncommitted: its record reaches 10
  run_record.write_summary(workdir, _segment(6, 10), {})
  summary = run_record.write_summary(workdir, _segment(8, 12, "finished"), {})
  segs = summary["segments"]
  assert [(s["start_step"], s["end_step"]) for s in segs] == [(0, 6), (6, 8), (8, 12)]
  assert segs[1]["status"] == "running; redone after step 8"
  assert [h["step"] for s in segs for h in s["train_history"]] == [2, 4, 6, 8, 10, 12]
  # A rerun from an earlier step replaces the segments that started at or after it.
  summary = run_record.write_summary(workdir, _segment(6, 12, "finished"), {})
  assert [(s["start_step"], s["end_step"]) for s in summary["segments"]] == [(0, 6), (6, 12)]
  assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_fault_specs_parse_and_bad_ones_are_one_line():
  assert faults.parse("kill@save_issued:8, sleep=2.5@barrier:startup/p1,kill@start") == {
      ("save_issued", "8"): ("kill", 0.0, None),
      ("barrier", "startup"): ("sleep", 2.5, 1), ("start", None): ("kill", 0.0, None)}
  for bad in ("kill", "explode@step:3", "sleep@step:3", "kill=3@step:3", "sleep=x@start",
              "kill@step:3/px"):
    with pytest.raises(ValueError, match=r"^MOE_JAX_FAULT entry .* is not ACTION@POINT"):
      faults.parse(bad)
