"""One rank of ZOTrainer's data-parallel tests (tests/test_trainer.py), launched by torchrun on the CPU (gloo):

python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trainer_dp_worker.py OUT_DIR [classifier]

A bf16 Llama, in-place perturbation with merged steps, a checkpoint every other step (written by rank 0 alone):
each rank writes whether the Trainer wrapped its model and its final weights. With ``classifier``: a sequence
classifier at lr = 0, whose loss averages over its own batch; each rank writes its steps' losses and the model's
loss over the whole dataset.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from zokern.integrations import ZOTrainer


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


def _finish() -> None:
    """No rank tears down its connections while another still uses them (gloo aborts the process otherwise)."""
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2:] == ["classifier"]:
        return classifier(out)
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
