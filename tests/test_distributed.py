"""The audit data-parallel under torchrun (deepexplain_audit, torch.distributed over gloo on the CPU): the shards,
two ranks against one process, a rank killed mid-audit and restarted, parts written under other settings. Runs
are kept tiny: the fast preset with 2 steps, a few embedded scenes, batches of 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import deepexplain_audit as audit
from test_audit import QUICK, QUICK_ARGS, ROOT, assert_same_audit, table

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
#: Kills rank 1 (SIGKILL, as the OOM killer would) when it starts its second batch, in torchrun's first try only,
#: leaving a file named ``killed`` beside the script.
KILL_RANK_1 = f"""
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
import deepexplain as de, deepexplain_cli as cli
real, calls = de.explain_batch, []
def dies_on_second(images, *a, **k):
    calls.append(1)
    if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and len(calls) == 2:
        (Path(__file__).parent / "killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(images, *a, **k)
de.explain_batch = dies_on_second
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process's audit of 8 scenes in batches of 2."""
    out = tmp_path_factory.mktemp("reference")
    audit.audit("scenes:8", out, batch=2, **QUICK)
    return out


def torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` from the repository, its output captured."""
    return subprocess.run([*TORCHRUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8, 16])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 5, 8, 9, 100])
def test_the_shards_are_disjoint_cover_every_batch_and_differ_by_one_at_most(world, count):
    shards = [list(audit.shard(count, rank, world)) for rank in range(world)]
    assert sorted(j for s in shards for j in s) == list(range(count))  # each batch once: disjoint and covering
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [list(audit.shard(count, rank, world)) for rank in range(world)]  # the same split again


def test_two_ranks_write_the_same_audit_as_one_process(tmp_path, reference):
    out = tmp_path / "out"
    run = torchrun("deepexplain.py", "audit", "scenes:8", "--batch", "2", "--out", str(out), *QUICK_ARGS)
    assert run.returncode == 0, run.stderr
    assert_same_audit(out, reference)  # the table but for `seconds`, and the maps exactly
    assert sorted(p.name for p in (out / "batches").glob("*.csv")) == sorted(
        p.name for p in (reference / "batches").glob("*.csv"))  # the same batch files, too
    *_, last, report = run.stdout.strip().splitlines()  # rank 0's lines only: the others print nothing
    assert last.startswith("audit: 8 images explained, 0 skipped as done, 0 errors")
    assert report == f"report: {out / 'report.html'}"
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["rank"], r["images"]) for r in summary["ranks"]] == [(0, 4), (1, 4)]
    assert all(r["seconds_busy"] > 0 and r["seconds_idle"] >= 0 for r in summary["ranks"])
    assert summary["explained"] == 8 and summary["rows"] == 8


def test_a_killed_rank_is_restarted_and_resumes_to_a_complete_audit(tmp_path, reference):
    out, script = tmp_path / "out", tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    run = torchrun("--max-restarts", "1", str(script), "audit", "scenes:8", "--batch", "2", "--out", str(out),
                   *QUICK_ARGS)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "killed").exists()
    paths = [row["path"] for row in audit.read_table(out)]
    assert sorted(paths) == sorted(row["path"] for row in table(reference / "audit.csv"))  # each image once
    assert_same_audit(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] >= 2 and summary["explained"] == 8 - summary["skipped"]  # restarted, and resumed


def test_the_merge_refuses_a_part_written_under_other_settings(tmp_path):
    out, other = tmp_path / "out", tmp_path / "other"
    audit.audit("scenes:2", out, batch=1, **QUICK)
    audit.audit("scenes:3", other, batch=1, **{**QUICK, "steps": 3})
    for part in (other / "batches").glob("00002.*"):  # a part of another audit lands among this one's
        shutil.copy(part, out / "batches" / part.name)
    with pytest.raises(ValueError, match=r"00002\.npz was written under other settings than the audit's: "
                                         r"settings\.steps 3 there, 2 now"):
        audit.audit("scenes:3", out, batch=1, resume=True, **QUICK)
