"""One rank of ZOTrainer's data-parallel tests (tests/test_trainer.py), launched by torchrun on the CPU (gloo):

python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trainer_dp_worker.py OUT_DIR [classifier|fsdp]

A bf16 Llama, in-place perturbation with merged steps, a checkpoint every other step (written by rank 0 alone):
each rank writes whether the Trainer wrapped its model and its final weights. With ``classifier``: a sequence
classifier at lr = 0, whose loss averages over its own batch; each rank writes its steps' losses and the model's
loss over the whole dataset. With ``fsdp``: ZOAdam on a Llama (all its weights, and LoRA adapters) replicated,
sharded by accelerate's FSDP2, and sharded again and resumed from the sharded run's checkpoint; each rank writes
the weights of each run, and the errors of resumes refused.
"""

import json
import shutil
import sys
from pathlib import Path

import peft
import torch
import torch.distributed as dist
import transformers
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from accelerate.utils import FullyShardedDataParallelPlugin
from helpers import fsdp2_on_cpu

from zokern.integrations import ZOTrainer
from zokern.optim import ZOSGD
from zokern.optim import ZOAdam


def classifier(out: Path) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 64, (32, 8), generator=generator), torch.randint(0, 3, (32,), generator=generator)
    with torch.no_grad():
        whole = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, labels).item()
    args = transformers.TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=8, max_steps=2, learning_rate=0.0,
        save_strategy="no", use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True, logging_steps=100,
    )  # fmt: skip
    data = [{"input_ids": row, "labels": label} for row, label in zip(ids, labels)]
    trainer = ZOTrainer(model=model, args=args, train_dataset=data, zo_optimizer_kwargs={"eps": 1e-3, "seed": 0})
    trainer.train()
    result = {"losses": [r["loss"] for r in trainer.zo_optimizer.trajectory], "whole": whole}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    _finish()


class _CPUShardingTrainer(ZOTrainer):
    """accelerate enables FSDP on accelerators only: its FSDP path (fully_shard, the optimizer's parameters swapped for
    their DTensors, the checkpoints), forced here over gloo on the CPU."""

    fsdp_version = 2
    state_dict_type = "SHARDED_STATE_DICT"

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        # Also in PartialState's shared state, from which each AcceleratorState() built later takes its own (as
        # accelerate sets it): else the Trainer's later accelerator calls see the CPU's MULTI_CPU again.
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        reshard = True if self.fsdp_version == 2 else "FULL_SHARD"  # (FSDP1 names its strategy)
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=self.fsdp_version, reshard_after_forward=reshard, state_dict_type=self.state_dict_type
        )
        if state.mixed_precision != "no":  # as accelerate's state sets a plugin's policy (bf16=True: bfloat16)
            state.fsdp_plugin.set_mixed_precision(state.mixed_precision)
        self.is_fsdp_enabled = True


class _CPUGatheringTrainer(_CPUShardingTrainer):
    """Checkpoints its model gathered (FULL_STATE_DICT): a model file from_pretrained loads."""

    state_dict_type = "FULL_STATE_DICT"


def _weights(model) -> list[list[float]]:
    """The whole weights (gathered from the shards of a sharded model: a collective)."""
    whole = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return [p.detach().float().flatten().tolist() for p in whole]


def sharded(out: Path) -> None:
    fsdp2_on_cpu()

    def trainer(cls, output_dir, lora=False, bf16=False, optimizer=ZOAdam, dtype=torch.float32):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config).to(dtype)
        if lora:  # (B initialised at random too: else the first steps' z on A would change no loss)
            config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            model = peft.get_peft_model(model, config)
        ids = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(1))
        args = transformers.TrainingArguments(
            output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
            save_strategy="steps", save_steps=2, use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True,
            logging_steps=100, bf16=bf16,
        )  # fmt: skip
        data = [{"input_ids": row, "labels": row} for row in ids]
        options = {"eps": 1e-2, "seed": 0}
        return cls(model=model, args=args, train_dataset=data, zo_optimizer_cls=optimizer, zo_optimizer_kwargs=options)

    result = {}
    # The runs by name: (whether the model is LoRA adapters, its dtype, the trainer that shards it), each against the
    # replicated run of its model. A bfloat16 model runs in the exact mode (its default), which perturbs the tensors
    # FSDP2 gathers for the forwards.
    bf16 = torch.bfloat16
    runs = {
        "full": (False, torch.float32, _CPUShardingTrainer),
        "lora": (True, torch.float32, _CPUShardingTrainer),
        "gathered": (False, torch.float32, _CPUGatheringTrainer),
        "exact": (False, bf16, _CPUShardingTrainer),
    }
    # The replicated runs first: accelerate's state (FSDP, once forced) outlives a trainer.
    for lora, dtype in sorted({(lora, dtype) for lora, dtype, _ in runs.values()}, key=str):
        replicated = trainer(ZOTrainer, out / f"replicated-{lora}-{dtype}", lora=lora, dtype=dtype)
        result[f"start {lora} {dtype}"] = _weights(replicated.model)
        replicated.train()
        result[f"replicated {lora} {dtype}"] = _weights(replicated.model)
        result[f"exact {lora} {dtype}"] = replicated.zo_optimizer.exact()
    for name, (lora, dtype, cls) in runs.items():
        run = trainer(cls, out / f"sharded-{name}", lora=lora, dtype=dtype)
        run.train()
        trained = [p for p in run.model.parameters() if p.requires_grad]
        result[name] = {"sharded types": sorted({type(p).__name__ for p in trained}), "sharded": _weights(run.model)}
        result[name]["exact"] = [run.zo_optimizer.exact(), result[f"exact {lora} {dtype}"]]
        checkpoint = out / f"sharded-{name}" / "checkpoint-2"
        result[name]["files"] = sorted(path.name for path in checkpoint.iterdir())
        resumed = trainer(cls, out / f"resumed-{name}", lora=lora, dtype=dtype)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        result[name]["resumed"] = _weights(resumed.model)
        result[name]["resumed steps"] = resumed.zo_optimizer.steps_taken
        result[name]["start"] = result[f"start {lora} {dtype}"]
        result[name]["replicated"] = result[f"replicated {lora} {dtype}"]
    # float32 shards, bfloat16 forwards (bf16=True: accelerate's FSDP2 policy, which casts the model's outputs to
    # bfloat16, the loss included, unless ZOTrainer drops that cast): its losses, and the run resumed halfway.
    mixed = trainer(_CPUShardingTrainer, out / "mixed", bf16=True)
    mixed.train()
    policy = mixed.accelerator.state.fsdp_plugin.mixed_precision_policy
    result["mixed"] = {
        "policy": [str(policy.param_dtype), str(policy.output_dtype)],
        "losses": [r["losses"] for r in mixed.zo_optimizer.trajectory],
        "sharded": _weights(mixed.model),
        "dtypes": sorted({str(p.dtype) for p in mixed.model.parameters()}),
    }
    resumed = trainer(_CPUShardingTrainer, out / "mixed-resumed", bf16=True)
    resumed.train(resume_from_checkpoint=str(out / "mixed" / "checkpoint-2"))
    result["mixed"]["resumed"] = _weights(resumed.model)
    # Resumed on another number of ranks than saved it: as if the files were three ranks' (the third a copy of the
    # second), or four's (two missing). ZOSGD keeps no per-parameter states: its files hold the same state dict,
    # which loads on any number of ranks; ZOAdam's hold each rank's rows, and say which rank saved them.
    sgd = trainer(_CPUShardingTrainer, out / "sgd", optimizer=ZOSGD)
    sgd.train()
    result["sgd"] = {"sharded": _weights(sgd.model)}
    dist.barrier()
    if dist.get_rank() == 0:
        for run, renamed, world in (("sgd", "sgd-three", 3), ("sharded-full", "three", 3), ("sharded-full", "four", 4)):
            shutil.copytree(out / run / "checkpoint-2", out / renamed)
            for path in (out / renamed).glob("rank*-of-2-*"):
                path.rename(path.with_name(path.name.replace("-of-2-", f"-of-{world}-")))
            if world == 3:
                shutil.copy(out / renamed / "rank1-of-3-optimizer.pt", out / renamed / "rank2-of-3-optimizer.pt")
    dist.barrier()
    resumed = trainer(_CPUShardingTrainer, out / "sgd-resumed", optimizer=ZOSGD)
    resumed.train(resume_from_checkpoint=str(out / "sgd-three"))
    result["sgd"]["resumed"] = _weights(resumed.model)
    errors = {}
    for renamed in ("three", "four"):
        try:
            trainer(_CPUShardingTrainer, out / "other").train(resume_from_checkpoint=str(out / renamed))
        except ValueError as e:
            errors[renamed] = str(e)
    try:  # the replicated run's checkpoint resumed sharded
        trainer(_CPUShardingTrainer, out / "other").train(
            resume_from_checkpoint=str(out / f"replicated-False-{torch.float32}" / "checkpoint-2")
        )
    except ValueError as e:
        errors["replicated"] = str(e)
    fsdp1 = type("FSDP1Trainer", (_CPUShardingTrainer,), {"fsdp_version": 1})
    try:
        trainer(fsdp1, out / "fsdp1").train()
    except ValueError as e:
        errors["fsdp1"] = str(e)
    result["errors"] = errors
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    _finish()


def _finish() -> None:
    """No rank tears down its connections while another still uses them (gloo aborts the process otherwise)."""
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2:] == ["classifier"]:
        return classifier(out)
    if sys.argv[2:] == ["fsdp"]:
        return sharded(out)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    ids = torch.randint(0, 64, (32, 8), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=2, max_steps=6, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True,
        logging_steps=100,
    )  # fmt: skip
    options = {"eps": 1e-2, "seed": 0, "merge_steps": True, "perturbation": "inplace"}
    trainer = ZOTrainer(model=model, args=args, train_dataset=data, zo_optimizer_kwargs=options)
    trainer.train()
    result = {
        "wrapped": type(trainer.model_wrapped).__name__,
        "weights": [p.detach().float().flatten().tolist() for p in model.parameters()],
        "steps": trainer.zo_optimizer.steps_taken,
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    _finish()


if __name__ == "__main__":
    main()
