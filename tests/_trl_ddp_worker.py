"""Run under ``torch.distributed.run --nproc_per_node 2`` (see test_trl_distributed.py): trains the tiny Llama for
3 steps once per ``RUN`` (``fast:<loss_type>`` for FastDPOTrainer, ``trl:<loss_type>`` for stock
trl.DPOTrainer), all in the same launch; every rank saves its final parameters and the world size it saw."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import _trl_runs  # noqa: E402


def run(kind, loss_type, out_dir, per_device, setup, stages=None):
    from trl import DPOTrainer

    from fastdpo.integrations.trl import FastDPOConfig, FastDPOTrainer

    cls, config_cls, kw = ((FastDPOTrainer, FastDPOConfig, {"fastdpo_backend": "cpu"}) if kind == "fast"
                           else (DPOTrainer, None, {}))
    ddp = {"ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", 1)) > 1 else {}
    if os.environ.get("FASTDPO_TEST_DEEPSPEED"):  # a DeepSpeed config file (ZeRO on CPU)
        ddp["deepspeed"] = os.environ["FASTDPO_TEST_DEEPSPEED"]
    args = _trl_runs.dpo_args(os.path.join(out_dir, f"{kind}-{loss_type}"), config_cls=config_cls,
                              per_device_train_batch_size=per_device, loss_type=loss_type, **ddp)
    trainers = []
    _, params = _trl_runs.train(cls, setup, args, keep=trainers, **kw)
    if stages is not None:
        t = trainers[0]
        stages.append(t.model_wrapped.zero_optimization_stage() if t.is_deepspeed_enabled else None)
    return params


def main(out_dir, per_device, *runs):
    setup = _trl_runs.setup(pairs=_trl_runs.DDP_PAIRS)
    stages = []
    result = {r: run(*r.split(":"), out_dir, per_device, setup, stages) for r in runs}
    result["deepspeed_stage"] = stages[0] if len(set(stages)) == 1 else stages
    result["world_size"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    torch.save(result, os.path.join(out_dir, f"rank{os.environ.get('RANK', 0)}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
