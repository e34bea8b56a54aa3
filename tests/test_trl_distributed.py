"""FastDPOTrainer under DDP: 2 processes on CPU (gloo), launched with ``torch.distributed.run`` (torchrun).

In one 2-process launch, FastDPOTrainer and stock trl.DPOTrainer each train the tiny Llama for 3 steps (2 pairs
per process, the 4-pair dataset being the global batch of every step), and FastDPOTrainer trains a token-level-KL
objective too. The final parameters must be the same on both ranks (gradients are synchronised), equal stock
TRL's under the same launch, and equal a single-process run on the same global batch (4 pairs per step): a
trainer that skipped DDP's gradient synchronisation would leave each rank fitted to its own half.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")

sys.path.insert(0, os.path.dirname(__file__))
import _trl_runs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = ["fast:sigmoid", "trl:sigmoid", "fast:rrpo"]


def _launch(out, runs, **env):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "_trl_ddp_worker.py"), str(out), "2", *runs]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return [torch.load(out / f"rank{i}.pt") for i in range(2)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("ddp"), RUNS)


def _single(run, tmp_path):
    from _trl_ddp_worker import run as train_one

    return train_one(*run.split(":"), str(tmp_path), 2 * 2, _trl_runs.setup(pairs=_trl_runs.DDP_PAIRS))


def _assert_same(a, b, what, exact=False):
    """The bound of the fp32 parity test (test_integrations_trl.py): the gradients agree to fp32 rounding, which
    AdamW turns into update differences far below one step (lr = 5e-2; measured here: at most 8e-6). Without
    gradient synchronisation the ranks' parameters would differ by about a step."""
    assert a.keys() == b.keys()
    lr = _trl_runs.dpo_args("unused").learning_rate
    for n in a:
        if exact:
            assert torch.equal(a[n], b[n]), f"{what}: {n}"
        else:
            torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-3 * lr, msg=f"{what}: {n}")


def test_two_processes(ddp):
    assert [r["world_size"] for r in ddp] == [2, 2], "torch.distributed.run did not start 2 processes"
    for run in RUNS:
        _assert_same(ddp[0][run], ddp[1][run], f"{run}: rank 0 vs rank 1", exact=True)


def test_ddp_matches_stock_trl_under_the_same_launch(ddp):
    _assert_same(ddp[0]["fast:sigmoid"], ddp[0]["trl:sigmoid"], "FastDPOTrainer vs trl.DPOTrainer under DDP")


@pytest.mark.parametrize("run", ["fast:sigmoid", "fast:rrpo"])
def test_ddp_matches_single_process_on_the_global_batch(ddp, run, tmp_path):
    single = _single(run, tmp_path)
    _assert_same(ddp[0][run], single, f"{run}: DDP vs single process")
    model0 = _trl_runs.setup(pairs=_trl_runs.DDP_PAIRS)[2]
    assert any(not torch.equal(p, model0.get_parameter(n)) for n, p in single.items())


ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
         "bf16": {"enabled": False}}


def test_deepspeed_zero2_on_cpu(tmp_path):
    """DeepSpeed ZeRO-2 with its CPU accelerator (gloo): 2 processes, FastDPOTrainer equal to stock TRL under the
    same launch and to the single-process run. Needs ``pip install deepspeed`` (not in the dev extras: its CPU
    communication op is compiled on first use, a few minutes on 2 cores)."""
    pytest.importorskip("deepspeed")
    import json

    cfg = tmp_path / "zero2.json"
    cfg.write_text(json.dumps(ZERO2))
    ranks = _launch(tmp_path, ["fast:sigmoid", "trl:sigmoid"], DS_ACCELERATOR="cpu",
                    FASTDPO_TEST_DEEPSPEED=str(cfg))
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["deepspeed_stage"] == 2 for r in ranks)
    _assert_same(ranks[0]["fast:sigmoid"], ranks[1]["fast:sigmoid"], "ZeRO-2 rank 0 vs rank 1", exact=True)
    _assert_same(ranks[0]["fast:sigmoid"], ranks[0]["trl:sigmoid"], "FastDPOTrainer vs trl.DPOTrainer under ZeRO-2")
    _assert_same(ranks[0]["fast:sigmoid"], _single("fast:sigmoid", tmp_path), "ZeRO-2 vs single process")
