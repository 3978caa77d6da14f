"""Data parallelism: two CPU processes (torchrun, gloo) reach the weights of one process."""

import os
import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent(
    """
    import sys

    import torch
    import torch.distributed as dist

    from pedaPEFT import data, train
    from pedaPEFT.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=48, block_size=16, n_layer=2, n_head=2, n_embd=16))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = train.TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, progress=False)
    # Examples of unequal length: the two halves of a batch hold different numbers of targets.
    result = train.train(model, lambda step: data.pretrain_batch(step, 8, 16), config)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0:
        torch.save({"state": model.state_dict(), "start": start, "losses": result.losses,
                    "world": world}, sys.argv[1])
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written its file; tear down together
        dist.destroy_process_group()
    """
)


def run(args: list[str], tmp_path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_match_one_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    run([str(worker), "single.pt"], tmp_path)
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
         "ddp.pt"], tmp_path)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert (single["world"], ddp["world"]) == (1, 2)
    torch.testing.assert_close(ddp["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    for name, value in single["state"].items():
        if name.endswith("attn.k.bias"):
            # Softmax ignores a shift shared by a row of scores, and q . b_k is such a shift:
            # the exact gradient of b_k is zero, the computed one is rounding noise, and Adam
            # scales noise up to steps of size lr. Its value carries no information.
            continue
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        if name.endswith("weight"):  # training moved every weight away from its start
            assert not torch.equal(value, single["start"][name]), name
