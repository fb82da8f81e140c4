"""Training on several processes: real torchrun launches of 2 CPU processes over gloo, compared with one.

The recipe's batch_size is the global batch, so 2 processes must take the very steps one process takes:
equal per-step losses (up to the order of float sums), checkpoints any number of processes resume.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genforge.cli import main
from genforge.common.config import load_recipe
from genforge.common.errors import ConfigError
from genforge.common.runs import RunDir
from genforge.jobs.train import run_recipe
from genforge.train import checkpoint, distributed
from tests.conftest import make_tiny_recipe
from tests.train.test_dpo import dpo_recipe
from tests.train.test_sft import LORA
from tests.train.test_sft import base_run as base_run  # noqa: F401  (the module fixture, shared)

SRC = Path(__file__).resolve().parents[2] / "src"
STOP = 0.000001  # a time budget that stops a run after its first step (which is checkpointed)
TINY = {"max_steps": 6, "eval_every": 3, "checkpoint_every": 3, "log_every": 1, "eval_batches": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m genforge train ...`, as the README documents it."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "genforge", "train", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunDir(run).read_metrics() if "loss" in r}


def val_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in RunDir(run).read_metrics() if "val_loss" in r}


def assert_same(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys() and a
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5), step


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, char_dataset):
    """The reference: the tiny LM recipe trained by one process."""
    root = tmp_path_factory.mktemp("dist")
    recipe = make_tiny_recipe(root, char_dataset, name="one", **TINY)
    run_recipe(recipe)
    return root, root / "runs" / "one"


@pytest.mark.slow
def test_two_ddp_processes_take_the_steps_of_one_and_resume_in_one(one_process, char_dataset):
    root, one = one_process
    recipe = make_tiny_recipe(root, char_dataset, name="two", **TINY)
    torchrun(str(recipe))
    two = root / "runs" / "two"
    assert_same(losses(two), losses(one))
    assert_same(val_losses(two), val_losses(one))
    meta = checkpoint.read_meta(two / "checkpoints" / "step-6")
    assert meta["world_size"] == 2 and len(meta["rng_ranks"]) == 1  # rank 1's random state is kept too
    assert (two / "metrics.jsonl").read_text().count('"step": 1,') == 1  # written once, by rank 0
    assert "| processes | 2 (ddp; global batch 8, 4 per process) |" in (two / "report.md").read_text()

    # a checkpoint of 2 processes resumes in 1 and continues as the uninterrupted run did
    shutil.rmtree(two / "checkpoints" / "step-6")
    shutil.rmtree(two / "checkpoints" / "best")
    out = run_recipe(recipe, resume=True)
    assert out.result.steps == 6
    assert_same(losses(two), losses(one))


@pytest.mark.slow
def test_fsdp_trains_on_two_processes_and_its_checkpoint_and_model_load_in_one(one_process, char_dataset):
    from transformers import AutoModelForCausalLM

    root, one = one_process
    recipe = make_tiny_recipe(root, char_dataset, name="fsdp", parallel="fsdp", activation_checkpointing="true",
                              time_budget=STOP, **TINY)
    torchrun(str(recipe))  # stops after step 1, checkpointed
    fsdp = root / "runs" / "fsdp"
    assert [p.name for p in RunDir(fsdp).checkpoints()] == ["step-1"]
    state = torch.load(fsdp / "checkpoints" / "step-1" / "state.pt", weights_only=True)
    assert all(type(t) is torch.Tensor for t in state["modules"]["model"].values())  # gathered, not shards
    torchrun(str(recipe), "--resume", "--set", "train.time_budget=null")  # FSDP resumes FSDP
    assert_same(losses(fsdp), losses(one))

    # ... and one plain process resumes it (parallel may change on resume), with the same steps
    shutil.rmtree(fsdp / "checkpoints" / "step-6")
    shutil.rmtree(fsdp / "checkpoints" / "best")
    run_recipe(recipe, ["train.parallel=ddp", "train.time_budget=null"], resume=True)
    assert_same(losses(fsdp), losses(one))
    model = AutoModelForCausalLM.from_pretrained(fsdp / "model")
    reference = AutoModelForCausalLM.from_pretrained(one / "model")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_dpo_with_lora_on_two_processes_keeps_pairs_together_and_exports_its_adapter(tmp_path, base_run):
    from transformers import AutoModelForCausalLM

    # a batch is B chosen rows then their B rejected rows: each process takes its pairs, both halves
    recipes = [dpo_recipe(tmp_path, base_run, name=n, lora=LORA, max_steps=2, eval_every=2, checkpoint_every=2,
                          log_every=1) for n in ("one", "two")]
    run_recipe(recipes[0])
    torchrun(str(recipes[1]))
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    assert_same(losses(two), losses(one))
    assert_same(val_losses(two), val_losses(one))
    assert (two / "adapters" / "two" / "adapter_model.safetensors").is_file()  # peft's layout, from rank 0
    assert AutoModelForCausalLM.from_pretrained(two / "model").config.num_hidden_layers == 2  # merged, plain HF


DIFFUSION = """name: {name}
family: diffusion
dataset: {dataset}
out_dir: {out}
model: {{block_out_channels: [8, 16], layers_per_block: 1, attention_levels: [], norm_groups: 4,
         num_train_timesteps: 100}}
train: {{max_steps: 6, batch_size: 16, lr: 2e-3, warmup_steps: 2, ema_decay: 0.9, eval_every: 3,
         eval_batches: 3, log_every: 1, checkpoint_every: 3, seed: 0, threads: 1}}
"""


@pytest.mark.slow
def test_diffusion_trains_with_fsdp_through_the_nproc_flag_and_resumes_in_one_process(tmp_path):
    from diffusers import UNet2DModel

    from genforge.data.images import prepare_image_dataset

    prepare_image_dataset("builtin:digits", tmp_path / "digits", size=8, val_fraction=0.2)
    recipe = tmp_path / "d.yaml"
    recipe.write_text(DIFFUSION.format(name="d", dataset=tmp_path / "digits", out=tmp_path / "runs"))
    run = tmp_path / "runs" / "d"
    fsdp = ["--set", "train.parallel=fsdp", "--set", "train.activation_checkpointing=true"]
    assert main(["train", str(recipe), "--nproc", "2", *fsdp]) == 0
    trained = losses(run)
    assert sorted(trained) == [1, 2, 3, 4, 5, 6] and trained[6] < trained[1]
    unet = UNet2DModel.from_pretrained(run / "model" / "unet")  # diffusers' layout, EMA weights, one process
    ema = torch.load(run / "checkpoints" / "step-6" / "state.pt", weights_only=True)["ema"]["unet"]
    for name, p in unet.state_dict().items():
        torch.testing.assert_close(p, ema[name])

    # the FSDP checkpoint (model, optimizer, EMA) resumes in one process
    shutil.rmtree(run / "checkpoints" / "step-6")
    shutil.rmtree(run / "checkpoints" / "best")
    out = run_recipe(recipe, ["train.parallel=ddp"], resume=True)
    assert out.result.steps == 6 and out.result.final_val["val_loss"] < 1.5


# ------------------------------------------------------------------ refusals, in one process (fast)

def _recipe(tmp_path, char_dataset, **train):
    return load_recipe(make_tiny_recipe(tmp_path, char_dataset, **train))


@pytest.mark.parametrize("train, world, message", [
    ({"parallel": "fsdp"}, 1, "train.parallel: fsdp shards the model over several processes, but this run has one"),
    ({"parallel": "none"}, 2, "train.parallel is none, but 2 processes were started"),
    ({"batch_size": 9}, 2, "train.batch_size: 9 is the global batch, split evenly over 2 processes; use a "
                           "multiple of 2"),
])
def test_launches_that_cannot_work_are_refused(tmp_path, char_dataset, train, world, message):
    with pytest.raises(ConfigError) as e:
        distributed.check(_recipe(tmp_path, char_dataset, **train), world)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("train.parallel=zero", "train.parallel: 'zero' is not one of none, ddp, fsdp"),
    ("train.tensor_parallel_size=2", "train.tensor_parallel_size: 2 asks for tensor parallelism, which is not "
                                     "implemented yet"),
    ("train.backend=nccl", "train.backend: nccl" if torch.cuda.is_available() else
     "train.backend: nccl needs CUDA GPUs and none is available"),
])
def test_cli_refuses_a_bad_distributed_recipe_on_one_line(tmp_path, char_dataset, capsys, override, message):
    if override == "train.backend=nccl" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe = make_tiny_recipe(tmp_path, char_dataset)
    code = main(["train", str(recipe), "--nproc", "2", "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # refused before torchrun started anything


def test_nproc_refuses_to_start_over_an_existing_run_before_starting_processes(tmp_path, char_dataset, capsys):
    recipe = make_tiny_recipe(tmp_path, char_dataset)
    (tmp_path / "runs" / "r" / "checkpoints" / "step-3").mkdir(parents=True)
    code = main(["train", str(recipe), "--nproc", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: run {tmp_path / 'runs' / 'r'} already exists; continue it with "
                                        "--resume") and err.count("\n") == 1


def test_nccl_on_a_cpu_device_is_refused_by_the_recipe(tmp_path, char_dataset):
    with pytest.raises(ConfigError, match="train.backend: nccl runs on CUDA GPUs only, but train.device is cpu"):
        _recipe(tmp_path, char_dataset, backend="nccl", device="cpu")


def test_fsdp_on_one_process_is_refused_before_training(tmp_path, char_dataset, capsys):
    code = main(["train", str(make_tiny_recipe(tmp_path, char_dataset)), "--set", "train.parallel=fsdp"])
    assert code == 2 and "start it with `genforge train RECIPE --nproc N`" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ the pieces, in one process (fast)

class _Batches:
    tokens_per_batch = 24

    def train_batch(self, index: int) -> dict:
        rows = torch.arange(6) + 10 * index
        return {"input_ids": rows[:, None].repeat(1, 4), "captions": [f"c{int(r)}" for r in rows]}

    def val_batches(self, n: int) -> list:
        return list(range(n))


def test_ranks_get_disjoint_rows_that_make_up_the_global_batch():
    data = _Batches()
    parts = [distributed.RankShard(data, distributed.Ranks(rank=r, world=3)).train_batch(5) for r in range(3)]
    assert [p["input_ids"].shape for p in parts] == [torch.Size([2, 4])] * 3
    torch.testing.assert_close(torch.cat([p["input_ids"] for p in parts]), data.train_batch(5)["input_ids"])
    assert sum((p["captions"] for p in parts), []) == data.train_batch(5)["captions"]
    assert distributed.RankShard(data, distributed.Ranks(rank=1, world=3)).tokens_per_batch == 24  # global


def test_every_rank_runs_the_same_number_of_eval_batches():
    shares = [distributed.my_share(list("abcde"), distributed.Ranks(rank=r, world=2)) for r in range(2)]
    assert shares == [[("a", 1.0), ("c", 1.0), ("e", 1.0)], [("b", 1.0), ("d", 1.0), ("a", 0.0)]]
    # a run without validation data evaluates nothing, on any number of processes
    assert distributed.my_share([], distributed.Ranks(rank=0, world=1)) == []
    assert distributed.my_share([], distributed.Ranks(rank=1, world=2)) == []


def test_blocks_are_the_decoder_layers_and_the_unet_levels():
    from diffusers import UNet2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=32))
    assert distributed.blocks(lm) == list(lm.model.layers)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    found = distributed.blocks(unet)
    levels = [*unet.down_blocks, *unet.up_blocks]
    assert [b for b in found if any(b is m for m in levels)] == levels
    others = [b for b in found if not any(b is m for m in levels)]  # the middle block's resnets and attention
    assert others and all(any(b is m for m in unet.mid_block.modules()) for b in others)
