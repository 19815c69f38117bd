"""ZOTrainer: the Hugging Face Trainer with a ZO step per gradient-accumulation window, on a tiny OPT from a config."""

from __future__ import annotations

import copy
import warnings

import helpers
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from zokern import ops  # noqa: E402
from zokern.integrations import ZOTrainer  # noqa: E402
from zokern.optim import ZOSGD  # noqa: E402
from zokern.optim import seeds  # noqa: E402

SEQ = 12


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences of one length (no padding): every micro-batch mean covers the same token count."""

    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 64, (n, SEQ), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[k], "labels": self.ids[k]}


def tiny_opt(dtype=torch.float32):
    return helpers.tiny_opt(dtype, dropout=0.1)  # dropout on in train mode: ZOTrainer must evaluate in eval mode


def arguments(tmp_path, **overrides):
    options = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        max_grad_norm=0.0,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def test_one_z_per_accumulation_window(tmp_path):
    model = tiny_opt()
    reference = copy.deepcopy(model).eval()  # the initial weights (tied embeddings stay tied)
    data = TokenDataset(4)  # one window of 2 micro-batches of 2: the whole dataset, whatever the order
    trainer = ZOTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=1),
        train_dataset=data,
        zo_optimizer_kwargs=dict(eps=1e-3, seed=5),
    )
    trainer.train()
    opt = trainer.zo_optimizer
    assert isinstance(opt, ZOSGD) and len(opt.trajectory) == 1
    record = opt.trajectory[0]

    # Rebuild L+ by hand: the initial model perturbed once along the step's z, all four sequences in one batch.
    params = [p for group in opt.param_groups for p in group["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = dict(reference.named_parameters())
    offset = 0
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                ops.perturb_(by_name[names[id(p)]].data, record["seed"], group["eps"], offset=offset)
                offset += p.numel()
        whole = reference(input_ids=data.ids, labels=data.ids).loss.item()
    assert record["seed"] == seeds.step_seed(5, 0) and len(params) == len(list(model.parameters()))
    assert record["losses"][0] == pytest.approx(whole, rel=1e-5)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0] == pytest.approx(record["loss"], rel=1e-5)


class MaskedTokenDataset(TokenDataset):
    """As TokenDataset, with prompt masking: one sequence has no labelled token, one only its second half."""

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        labels = self.ids[k].clone()
        labels[: {0: 0, 1: SEQ, 2: SEQ // 2}.get(k, 0)] = -100
        return {"input_ids": self.ids[k], "labels": labels}


def _sum_over_window(outputs, labels, num_items_in_batch):
    logits = outputs.logits[:, :-1].float()
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), labels[:, 1:].reshape(-1), reduction="sum")
    return total / num_items_in_batch


@pytest.mark.parametrize("loss_func", [None, _sum_over_window], ids=["model loss", "compute_loss_func"])
def test_the_window_loss_weights_micro_batches_by_their_labelled_tokens(tmp_path, loss_func):
    """As the Trainer's own steps: each micro-batch's summed loss over the window's item count. A micro-batch with no
    labelled token (prompt masking at batch size 1) counts for nothing instead of making the step NaN."""
    model = tiny_opt()
    reference = copy.deepcopy(model).eval()
    data = MaskedTokenDataset(4)  # one window of 4 micro-batches of 1: the whole dataset, whatever the order
    trainer = ZOTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=4),
        train_dataset=data,
        compute_loss_func=loss_func,
        zo_optimizer_kwargs=dict(eps=1e-4, seed=0),
    )
    trainer.train()
    record = trainer.zo_optimizer.trajectory[0]
    assert not record["skipped"] and trainer.zo_optimizer.nonfinite_steps == 0
    batch = [data[k] for k in range(4)]
    with torch.no_grad():  # the token-weighted mean over the whole window, at the starting weights
        labels = torch.stack([b["labels"] for b in batch])
        whole = reference(input_ids=torch.stack([b["input_ids"] for b in batch]), labels=labels).loss.item()
    assert sum(record["losses"]) / 2 == pytest.approx(whole, rel=1e-4)  # (L+ + L-)/2 = L(theta) + O(eps^2)


class _InOrder(ZOTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def test_a_window_opening_with_a_micro_batch_of_no_labelled_token_is_still_weighted_by_tokens(tmp_path):
    """The probe of whether the loss divides by the item count read only the window's first micro-batch: one with
    every label ignored gives 0 with either count, so a causal LM was taken for a per-batch mean, and later windows
    holding such a micro-batch stepped on NaN."""
    model = tiny_opt()
    reference = copy.deepcopy(model).eval()
    ids = torch.randint(0, 64, (4, SEQ), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0] = -100  # the first window opens with a sequence of no labelled token
    labels[3, : SEQ // 2] = -100
    data = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]
    trainer = _InOrder(
        model=model,
        args=arguments(
            tmp_path, max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=2, learning_rate=0.0
        ),
        train_dataset=data,
        zo_optimizer_kwargs=dict(eps=1e-4, seed=0),
    )
    trainer.train()
    assert trainer._loss_takes_item_count is True and trainer.zo_optimizer.nonfinite_steps == 0
    for window, record in zip((slice(0, 2), slice(2, 4)), trainer.zo_optimizer.trajectory):
        with torch.no_grad():  # the token-weighted mean over the window
            whole = reference(input_ids=ids[window], labels=labels[window]).loss.item()
        assert sum(record["losses"]) / 2 == pytest.approx(whole, rel=1e-4)


class LabelledDataset(torch.utils.data.Dataset):
    """Sequences with a class label: a sequence classifier's loss is a mean over its batch, whatever item count its
    forward (which takes **kwargs) is handed."""

    def __init__(self, n: int) -> None:
        self.ids = torch.randint(5, 64, (n, SEQ), generator=torch.Generator().manual_seed(4))
        self.labels = (self.ids[:, 1] >= 34).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[k], "labels": self.labels[k]}


def test_a_sequence_classifier_steps_on_the_window_mean_not_the_sum_of_its_micro_batch_means(tmp_path):
    """Its forward accepts loss kwargs, so the Trainer passes the item count and adds the micro-batches' losses; the
    loss ignores the count, so that sum was k means: a step (and logged loss) k times too large. The same examples
    in one batch and in a window of two give the same step."""
    config = transformers.RobertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ + 4, num_labels=2, pad_token_id=1,
    )  # fmt: skip
    records = []
    for batch, accumulation in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        trainer = ZOTrainer(
            model=transformers.RobertaForSequenceClassification(config),
            args=arguments(
                tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation
            ),
            train_dataset=LabelledDataset(8),
            zo_optimizer_kwargs=dict(eps=1e-3, seed=0),
        )
        trainer.train()
        records.append(trainer.zo_optimizer.trajectory[0])
    assert records[1]["losses"] == pytest.approx(records[0]["losses"], rel=1e-5)
    assert records[1]["projected_grad"] == pytest.approx(records[0]["projected_grad"], rel=1e-2, abs=1e-4)


def test_one_process_on_several_gpus_averages_the_replicas_losses(tmp_path):
    """nn.DataParallel (args.n_gpu > 1) gathers one loss per GPU: averaged, as Trainer.training_step does."""

    class PerReplicaLoss(ZOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
            # As two replicas' gather: (2, 1) where transformers hands each replica a (1, 1) item count.
            return torch.stack([loss, loss + 1.0]).reshape(2, 1)

    model = tiny_opt().eval()
    trainer = PerReplicaLoss(model=model, args=arguments(tmp_path), train_dataset=TokenDataset(4))
    trainer.args._n_gpu = 2
    batch = {"input_ids": TokenDataset(4).ids[:2], "labels": TokenDataset(4).ids[:2]}
    window = [{**batch, "zokern.num_items_in_batch": None}]
    with torch.no_grad():
        expected = model(**batch).loss.item() + 0.5
    assert trainer._window_closure(model, window)().item() == pytest.approx(expected, rel=1e-6)
    # The probe of whether the loss takes the item count (a window of several) reads the replicas' mean too.
    counted = [{**batch, "zokern.num_items_in_batch": torch.tensor(2 * (batch["labels"].shape[1] - 1))}] * 2
    assert trainer._takes_item_count(model, counted) is True


def test_the_item_count_probe_gives_a_sampling_loss_the_same_draws_and_leaves_torchs_random_state(tmp_path):
    # A loss that drops tokens at random drew other tokens for its two probe calls: taken to divide by the count,
    # its window summed the micro-batches' means (k times the loss); and the probe's draws moved torch's generator, so
    # a resumed run, which probes at its first window, drew otherwise than the run it resumed.
    class TokenDropout(ZOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"].clone()
            labels[torch.rand(labels.shape) < 0.3] = -100
            return model(input_ids=inputs["input_ids"], labels=labels).loss  # a mean: the count is not taken

    model = tiny_opt().eval()
    trainer = TokenDropout(model=model, args=arguments(tmp_path), train_dataset=TokenDataset(4))
    batch = {"input_ids": TokenDataset(4).ids[:2], "labels": TokenDataset(4).ids[:2]}
    counted = [{**batch, "zokern.num_items_in_batch": torch.tensor(2 * (batch["labels"].shape[1] - 1))}] * 2
    torch.manual_seed(3)
    state = torch.get_rng_state()
    assert trainer._takes_item_count(model, counted) is False
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "options,exc,match",
    [
        (dict(zo_optimizer_cls=torch.optim.AdamW), TypeError, "zo_optimizer_cls must be a zokern.optim optimizer"),
        (dict(zo_optimizer_kwargs={"weight_decay": 0.5}), ValueError, r"TrainingArguments\(weight_decay=...\)"),
        (dict(zo_optimizer_kwargs={"lr": 0.5}), ValueError, r"TrainingArguments\(learning_rate=...\)"),
        (dict(optimizer_cls_and_kwargs=(ZOSGD, {"eps": 1e-2})), ValueError, "not optimizer_cls_and_kwargs"),
    ],
)
def test_optimizer_options_the_trainer_would_ignore_are_refused(tmp_path, options, exc, match):
    with pytest.raises(exc, match=match):
        ZOTrainer(model=tiny_opt(), args=arguments(tmp_path), train_dataset=TokenDataset(4), **options)


def test_a_sixteen_bit_loss_from_compute_loss_is_reported(tmp_path):
    class SixteenBitLoss(ZOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs).logits  # bf16, and so is the loss
            return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))

    trainer = SixteenBitLoss(model=tiny_opt(torch.bfloat16), args=arguments(tmp_path, max_steps=1),
                             train_dataset=TokenDataset(4))  # fmt: skip
    with pytest.warns(UserWarning, match="compute_loss returned a bfloat16 loss"):
        trainer.train()


def test_trains_evaluates_and_resumes_bit_identically(tmp_path):
    data = TokenDataset(16)
    uninterrupted = tiny_opt()
    trainer = ZOTrainer(
        model=uninterrupted,
        args=arguments(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=data,
        eval_dataset=TokenDataset(4),
        zo_optimizer_kwargs=dict(seed=1, n_probes=2),
    )
    trainer.train()
    assert len(trainer.zo_optimizer.trajectory) == 4
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))

    resumed_model = tiny_opt()
    resumed = ZOTrainer(
        model=resumed_model,
        args=arguments(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=data,
        zo_optimizer_kwargs=dict(seed=999, n_probes=2),  # the checkpoint's seed wins
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.zo_optimizer.steps_taken == 4
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


def test_a_checkpoint_without_the_zo_optimizers_state_is_refused_as_a_resume_point(tmp_path):
    # save_only_model=True: the Trainer went on with a new optimizer, whose seeds started over (the run's
    # perturbations repeated) with the lr schedule; a first-order Trainer's optimizer.pt: an error naming no file.
    data = TokenDataset(16)
    saving = arguments(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2, save_only_model=True)
    ZOTrainer(model=tiny_opt(), args=saving, train_dataset=data).train()
    checkpoint = str(tmp_path / "a" / "checkpoint-2")
    resumed = ZOTrainer(model=tiny_opt(), args=arguments(tmp_path / "a", max_steps=4), train_dataset=data)
    with pytest.raises(ValueError, match=r"checkpoint-2 holds no optimizer.pt nor scheduler.pt \(saved with save_only"):
        resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.zo_optimizer.steps_taken == 0
    # The Trainer loads the optimizer only with its scheduler: without that file it went on with new ones too.
    saving = arguments(tmp_path / "c", max_steps=2, save_strategy="steps", save_steps=2)
    ZOTrainer(model=tiny_opt(), args=saving, train_dataset=data).train()
    (tmp_path / "c" / "checkpoint-2" / "scheduler.pt").unlink()
    resumed = ZOTrainer(model=tiny_opt(), args=arguments(tmp_path / "c", max_steps=4), train_dataset=data)
    with pytest.raises(ValueError, match=r"checkpoint-2 holds no scheduler.pt \("):
        resumed.train(resume_from_checkpoint=str(tmp_path / "c" / "checkpoint-2"))
    first_order = arguments(tmp_path / "b", max_steps=2, save_strategy="steps", save_steps=2)
    transformers.Trainer(model=tiny_opt(), args=first_order, train_dataset=data).train()
    resumed = ZOTrainer(model=tiny_opt(), args=arguments(tmp_path / "b", max_steps=4), train_dataset=data)
    with pytest.raises(ValueError, match=r"optimizer.pt is not a zokern optimizer's state dict \(a first-order"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))


def test_the_learning_rate_schedule_drives_the_zo_steps(tmp_path):
    """accelerate reloads the optimizer's state when it wraps it, replacing the ZO optimizer's param groups: the
    scheduler must still set the lr the ZO steps use, warmup included, and the logged rate must be that one."""
    trainer = ZOTrainer(
        model=tiny_opt(),
        args=arguments(tmp_path, max_steps=6, lr_scheduler_type="linear", warmup_steps=2),
        train_dataset=TokenDataset(24),
        zo_optimizer_kwargs=dict(seed=0),
    )
    trainer.train()
    used = [record["lr"][0] for record in trainer.zo_optimizer.trajectory]
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert used == pytest.approx([0.0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert logged == pytest.approx(used)


def test_first_order_arguments_are_reported_and_no_gradient_norm_is_logged(tmp_path):
    args = arguments(
        tmp_path, max_steps=1, optim="adafactor", adam_beta1=0.5, max_grad_norm=0.5, neftune_noise_alpha=5.0
    )
    trainer = ZOTrainer(model=tiny_opt(), args=args, train_dataset=TokenDataset(4))
    with pytest.warns(UserWarning, match=r"optim=adafactor, adam_beta1=0.5, max_grad_norm=0.5, neftune_noise_alpha=5"):
        trainer.train()
    assert all("grad_norm" not in entry for entry in trainer.state.log_history)


def test_fp16_autocast_steps_without_the_grad_scaler(tmp_path, monkeypatch):
    """On a GPU, fp16=True gives accelerate a GradScaler, whose step asserts that a backward scaled the loss: the
    training stopped after its first ZO step. Here the scaler accelerate builds on CUDA, put on a CPU accelerator."""
    import accelerate

    build = accelerate.Accelerator.__init__

    def with_scaler(self, *args, **kwargs):
        build(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu")

    monkeypatch.setattr(accelerate.Accelerator, "__init__", with_scaler)
    trainer = ZOTrainer(model=tiny_opt(), args=arguments(tmp_path, max_steps=3), train_dataset=TokenDataset(12))
    trainer.train()
    assert trainer.accelerator.scaler is None and trainer.zo_optimizer.steps_taken == 3


def test_the_device_cache_is_cleared_every_torch_empty_cache_steps(tmp_path, monkeypatch):
    from zokern.integrations import transformers as integration

    cleared = []
    monkeypatch.setattr(integration, "clear_device_cache", lambda *a, **k: cleared.append(1))
    args = arguments(tmp_path, max_steps=4, gradient_accumulation_steps=1, torch_empty_cache_steps=2)
    ZOTrainer(model=tiny_opt(), args=args, train_dataset=TokenDataset(8)).train()
    assert len(cleared) == 2


def test_merged_steps_evaluate_and_checkpoint_the_true_parameters(tmp_path):
    """With merge_steps the parameters hold theta + eps z(next) between steps: the Trainer's evaluation and its
    checkpoints must still see theta, so a merged run logs and saves what an unmerged one does."""
    safetensors = pytest.importorskip("safetensors.torch")
    data, runs = TokenDataset(16), {}
    for merge in (False, True):
        model = tiny_opt()
        args = arguments(
            tmp_path / str(merge), max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2
        )
        kwargs = dict(seed=1, perturbation="inplace", merge_steps=merge)
        trainer = ZOTrainer(
            model=model, args=args, train_dataset=data, eval_dataset=TokenDataset(4), zo_optimizer_kwargs=kwargs
        )
        trainer.train()
        assert not trainer.zo_optimizer._lookahead.pending  # train() hands back the true weights
        evals = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
        saved = safetensors.load_file(str(tmp_path / str(merge) / "checkpoint-2" / "model.safetensors"))
        runs[merge] = dict(model.named_parameters()), evals, saved
    (plain, plain_evals, plain_saved), (merged, merged_evals, merged_saved) = runs[False], runs[True]
    assert len(merged_evals) == 2 and merged_evals == pytest.approx(plain_evals, rel=1e-5)
    assert merged_saved.keys() == plain_saved.keys()
    for name in plain_saved:
        torch.testing.assert_close(merged_saved[name], plain_saved[name], atol=1e-5, rtol=0)
    for name in plain:
        torch.testing.assert_close(merged[name], plain[name], atol=1e-5, rtol=0)


def test_callbacks_at_the_end_of_a_merged_run_see_the_trained_weights(tmp_path):
    # on_train_end (where weights are exported, averaged, merged) runs inside Trainer.train(): before ZOTrainer's
    # own take-back after it, a merged run's weights there held the next step's perturbation.
    seen = {}

    class Export(transformers.TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            seen.update({n: p.detach().clone() for n, p in model.named_parameters()})

    model = tiny_opt()
    kwargs = dict(seed=1, perturbation="inplace", merge_steps=True)
    trainer = ZOTrainer(
        model=model, args=arguments(tmp_path), train_dataset=TokenDataset(16), zo_optimizer_kwargs=kwargs,
        callbacks=[Export()],
    )  # fmt: skip
    trainer.train()
    assert seen and all(torch.equal(seen[n], p.detach()) for n, p in model.named_parameters())


def test_a_training_step_override_that_takes_no_zo_step_is_reported(tmp_path):
    class FirstOrderHabit(ZOTrainer):  # a training_step kept from another trainer, without super()
        def training_step(self, model, inputs, num_items_in_batch=None):
            return self.compute_loss(model, inputs).detach()

    trainer = FirstOrderHabit(model=tiny_opt(), args=arguments(tmp_path), train_dataset=TokenDataset(16))
    with pytest.warns(UserWarning, match="no ZO step was taken for this window"):
        trainer.train()
    assert trainer.zo_optimizer.steps_taken == 0


def test_a_batch_the_model_computes_no_loss_from_is_named(tmp_path):
    class NoLabels(TokenDataset):
        def __getitem__(self, k):
            return {"input_ids": self.ids[k]}

    class TupleOutputs(ZOTrainer):  # as a model returning a tuple of its logits hands them to compute_loss
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).logits

    trainer = TupleOutputs(model=tiny_opt(), args=arguments(tmp_path), train_dataset=NoLabels(16))
    named = r"compute_loss returned a tensor of shape \(2, \d+, \d+\), not a loss.*labels"
    with pytest.raises(ValueError, match=named):
        trainer.train()

    class OneScore(ZOTrainer):  # a score head's (batch, 1) output at batch 1: one number, still not a loss
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).logits[:, -1, :1]

    args = arguments(tmp_path, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match=r"shape \(1, 1\), not a loss"):
        OneScore(model=tiny_opt(), args=args, train_dataset=NoLabels(16)).train()

    class PerExample(ZOTrainer):  # labels given, the losses not reduced: not a missing label
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"]).logits[:, :-1].transpose(1, 2)
            return torch.nn.functional.cross_entropy(logits, inputs["labels"][:, 1:], reduction="none").mean(1)

    with pytest.raises(ValueError, match=r"shape \(2,\), not a loss: one loss per example or token\? reduce them"):
        PerExample(model=tiny_opt(), args=arguments(tmp_path), train_dataset=TokenDataset(16)).train()


def test_a_graph_capturing_optimizer_gets_one_closure_over_static_inputs(tmp_path, monkeypatch):
    """cuda_graph=True: the windows are copied into tensors one closure reads (what a capture replays); the steps
    equal those of the ordinary closures (on the CPU the graph's passes run uncaptured)."""
    closures = []
    step = ZOSGD.step
    monkeypatch.setattr(ZOSGD, "step", lambda self, closure=None: closures.append(closure) or step(self, closure))
    models = []
    for graph in (False, True):
        model = tiny_opt()
        trainer = ZOTrainer(
            model=model,
            args=arguments(tmp_path / str(graph), max_steps=3),
            train_dataset=TokenDataset(16),
            zo_optimizer_kwargs=dict(seed=1, perturbation="inplace", cuda_graph=graph),
        )
        trainer.train()
        models.append(model)
    assert len({id(c) for c in closures[:3]}) == 3 and len({id(c) for c in closures[3:]}) == 1
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name


def test_a_window_of_other_shapes_gets_new_static_inputs():
    from zokern.integrations.transformers import _signature
    from zokern.integrations.transformers import _StaticWindow

    def window(n, dtype=torch.int64, **extra):
        return [{"input_ids": torch.randint(0, 64, (2, n)).to(dtype), "labels": torch.randint(0, 64, (2, n)), **extra}]

    model = torch.nn.Linear(1, 1)
    first = window(8)
    static = _StaticWindow(first, _signature(first), model, lambda m, w: lambda: w)
    assert static.closure() is static.window and static.window[0]["input_ids"] is not first[0]["input_ids"]
    second = window(8)
    assert static.fits(_signature(second), model)
    static.load(second)
    assert torch.equal(static.window[0]["input_ids"], second[0]["input_ids"])
    assert not static.fits(_signature(second), torch.nn.ReLU())
    for other in (
        window(9),  # shape
        window(8, torch.int32),  # dtype: copy_ would cast silently
        [{"input_ids": second[0]["input_ids"]}],  # a key missing: its static value would be stale
        window(8, flag=True),  # a key more
    ):
        assert not static.fits(_signature(other), model)
    assert _signature(window(8, scale=float("nan"))) == _signature(window(8, scale=float("nan")))
    for unsupported in ([1, 2], torch.eye(2).to_sparse(), {"a": torch.ones(2)}):
        assert _signature(window(8, extra=unsupported)) is None  # steps run uncaptured, with a warning


def test_shapes_that_keep_changing_are_reported(tmp_path):
    model = tiny_opt()
    trainer = ZOTrainer(model=model, args=arguments(tmp_path), train_dataset=TokenDataset(4))
    closures = []
    with pytest.warns(UserWarning, match="keep changing shape"):
        for n in (8, 9, 10, 11, 12):
            ids = torch.randint(0, 64, (2, n))
            closures.append(trainer._static_closure(model, [{"input_ids": ids, "labels": ids}]))
    assert len({id(c) for c in closures}) == 5
    ids = torch.randint(0, 64, (2, 12))
    assert trainer._static_closure(model, [{"input_ids": ids, "labels": ids}]) is closures[-1]


@pytest.mark.filterwarnings("ignore:zokern. cuda_graph=True and step")
def test_batches_that_static_inputs_cannot_hold_train_uncaptured_with_a_warning(tmp_path):
    class WithAList(TokenDataset):
        def __getitem__(self, k):
            return dict(super().__getitem__(k), note=[k])

    def collate(items):
        return {
            "input_ids": torch.stack([i["input_ids"] for i in items]),
            "labels": torch.stack([i["labels"] for i in items]),
            "note": [i["note"] for i in items],
        }

    class Model(torch.nn.Module):  # ignores the extra key
        def __init__(self):
            super().__init__()
            self.inner = tiny_opt()

        def forward(self, input_ids, labels, note):
            return self.inner(input_ids=input_ids, labels=labels)

    trainer = ZOTrainer(
        model=Model(),
        args=arguments(tmp_path, max_steps=2, remove_unused_columns=False),
        train_dataset=WithAList(8),
        data_collator=collate,
        zo_optimizer_kwargs=dict(seed=1, perturbation="inplace", cuda_graph=True),
    )
    with pytest.warns(UserWarning, match="cannot copy this batch into static inputs"):
        trainer.train()
    assert len(trainer.zo_optimizer.trajectory) == 2


def test_bf16_model_trains(tmp_path):
    model = tiny_opt(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = ZOTrainer(model=model, args=arguments(tmp_path), train_dataset=TokenDataset(8))
    trainer.train()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in trainer.zo_optimizer.trajectory)


def test_peft_lora_model_trains_only_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_opt(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = ZOTrainer(model=model, args=arguments(tmp_path, learning_rate=1e-2), train_dataset=TokenDataset(8))
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable


def test_bf16_lora_adapters_resume_in_bf16_bit_identically(tmp_path):
    """The Trainer resumes a PEFT model through load_adapter, which casts 16-bit adapters to float32: the resumed run
    trained float32 adapters (another perturbation and rounding mode) and ended elsewhere than the uninterrupted one."""
    peft = pytest.importorskip("peft")

    def lora_bf16():
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)  # fmt: skip
        return peft.get_peft_model(tiny_opt(torch.bfloat16), config, autocast_adapter_dtype=False)

    def train(model, resume=None):
        args = arguments(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2)
        ZOTrainer(model=model, args=args, train_dataset=TokenDataset(16), zo_optimizer_kwargs=dict(seed=1)).train(
            resume_from_checkpoint=resume
        )
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    uninterrupted = train(lora_bf16())
    with warnings.catch_warnings():
        # Nor does the optimizer's load see parameters of another dtype than the saved run's.
        warnings.filterwarnings("error", message="the loaded state dict's run trained", category=UserWarning)
        resumed = train(lora_bf16(), resume=str(tmp_path / "a" / "checkpoint-2"))
    assert {p.dtype for p in resumed.values()} == {torch.bfloat16}
    for name, p in uninterrupted.items():
        assert torch.equal(p, resumed[name]), name


def test_ldsd_drops_in_with_lora_and_keeps_its_mean_per_adapter(tmp_path):
    """LDSD in the Trainer (LoRA adapters trainable): each ZO step is K + 1 evaluations of the window's loss, mu lives
    beside each adapter, and the logged loss is the step's (f* + f-)/2."""
    peft = pytest.importorskip("peft")
    from zokern.optim import LDSD

    model = peft.get_peft_model(
        tiny_opt(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = ZOTrainer(model=model, args=arguments(tmp_path, learning_rate=1e-2), train_dataset=TokenDataset(8),
                        zo_optimizer_cls=LDSD, zo_optimizer_kwargs={"k": 3, "mu_lr": 10.0, "seed": 0})  # fmt: skip
    trainer.train()
    opt = trainer.zo_optimizer
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert [len(r["losses"]) for r in opt.trajectory] == [3 + 1] * 3
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert all(opt.state[p]["mu"].shape == p.shape for p in adapters)
    assert any(bool(opt.state[p]["mu"].any()) for p in adapters)


def test_rejects_a_foreign_optimizer(tmp_path):
    model = tiny_opt()
    with pytest.raises(ValueError, match="zo_optimizer"):
        ZOTrainer(
            model=model,
            args=arguments(tmp_path),
            train_dataset=TokenDataset(4),
            optimizers=(torch.optim.AdamW(model.parameters()), None),
        )


def test_a_scheduler_not_built_on_the_zo_optimizer_is_refused(tmp_path):
    """A scheduler built on another optimizer (a script's AdamW kept) would be logged while the steps kept a
    constant lr; one built on zo_optimizer drives the steps."""
    model = tiny_opt()
    adamw = torch.optim.AdamW(model.parameters())
    foreign = torch.optim.lr_scheduler.LambdaLR(adamw, lambda step: 0.5)
    with pytest.raises(ValueError, match="with no zo_optimizer: the scheduler sets the lr of the optimizer"):
        ZOTrainer(model=model, args=arguments(tmp_path), train_dataset=TokenDataset(4), optimizers=(None, foreign))
    zo = ZOSGD(model.parameters(), lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="built on an AdamW, not on zo_optimizer"):
        ZOTrainer(
            model=model,
            args=arguments(tmp_path),
            train_dataset=TokenDataset(4),
            zo_optimizer=zo,
            optimizers=(None, foreign),
        )
    halving = torch.optim.lr_scheduler.LambdaLR(zo, lambda step: 0.5**step)
    trainer = ZOTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=3),
        train_dataset=TokenDataset(12),
        zo_optimizer=zo,
        optimizers=(None, halving),
    )
    trainer.train()
    assert [record["lr"][0] for record in zo.trajectory] == pytest.approx([1e-3, 5e-4, 2.5e-4])


class _PerLayerRates(ZOTrainer):
    """A create_optimizer override, as scripts write for per-layer learning rates."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            head = [p for n, p in self.model.named_parameters() if "layers.1." in n]
            rest = [p for n, p in self.model.named_parameters() if "layers.1." not in n]
            groups = [{"params": rest}, {"params": head, "lr": 10 * self.args.learning_rate}]
            self.optimizer = ZOSGD(groups, lr=self.args.learning_rate, seed=0)
        return self.optimizer


class _FirstOrderOverride(ZOTrainer):
    def create_optimizer(self, model=None):
        self.optimizer = torch.optim.AdamW(self.model.parameters())
        return self.optimizer


def test_a_zo_optimizer_built_by_a_create_optimizer_override_takes_the_steps(tmp_path):
    model = tiny_opt()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = _PerLayerRates(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=TokenDataset(8))
    trainer.train()
    assert isinstance(trainer.zo_optimizer, ZOSGD) and trainer.zo_optimizer.steps_taken == 2
    lrs = [record["lr"] for record in trainer.zo_optimizer.trajectory]  # the Trainer's linear decay scales both
    assert [lr for pair in lrs for lr in pair] == pytest.approx([1e-3, 1e-2, 5e-4, 5e-3])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(TypeError, match=r"_FirstOrderOverride.create_optimizer built an AdamW, but ZOTrainer steps"):
        _FirstOrderOverride(model=tiny_opt(), args=arguments(tmp_path), train_dataset=TokenDataset(8)).train()


class _PassThrough(ZOTrainer):
    def create_optimizer(self, model=None):  # (logging, say)
        return super().create_optimizer(model)


class _PerLayerRatesMixin:
    create_optimizer = _PerLayerRates.__dict__["create_optimizer"].__wrapped__


class _MixedIn(_PerLayerRatesMixin, ZOTrainer):
    pass


def test_keywords_of_the_trainer_or_of_a_combined_trainer_class_reach_it(tmp_path):
    """ZOTrainer reads optimizers and optimizer_cls_and_kwargs, positional or not, and validates nothing else: a
    combined class's own keywords (TRL's SFTTrainer takes peft_config) reach that class."""

    class Formatting(transformers.Trainer):
        def __init__(self, *args, formatting_func=None, **kwargs):
            self.formatting_func = formatting_func
            super().__init__(*args, **kwargs)

    class Combined(ZOTrainer, Formatting):
        pass

    trainer = Combined(model=tiny_opt(), args=arguments(tmp_path), train_dataset=TokenDataset(4), formatting_func=str)
    assert trainer.formatting_func is str
    model = tiny_opt()
    with pytest.raises(ValueError, match="not optimizers="):  # (optimizers is the Trainer's 11th parameter)
        ZOTrainer(model, arguments(tmp_path), None, TokenDataset(4), None, None, None, None, None, None,
                  (torch.optim.AdamW(model.parameters()), None))  # fmt: skip

    class NoModelInit(transformers.Trainer):  # TRL's SFTTrainer order: optimizers is the 10th positional
        def __init__(self, model, args, data_collator=None, train_dataset=None, eval_dataset=None,
                     processing_class=None, compute_loss_func=None, compute_metrics=None, callbacks=None,
                     optimizers=(None, None)):  # fmt: skip
            super().__init__(model, args, data_collator, train_dataset, eval_dataset, processing_class,
                             compute_loss_func=compute_loss_func, compute_metrics=compute_metrics,
                             callbacks=callbacks, optimizers=optimizers)  # fmt: skip

    class Reordered(ZOTrainer, NoModelInit):
        pass

    with pytest.raises(ValueError, match="not optimizers="):
        Reordered(model, arguments(tmp_path), None, TokenDataset(4), None, None, None, None, None,
                  (torch.optim.AdamW(model.parameters()), None))  # fmt: skip


def test_overrides_from_a_mixin_or_passing_through_train_again(tmp_path):
    """The second train() finds accelerate's wrapper of the optimizer ZOTrainer built; a mixin's create_optimizer
    is adopted as a subclass's own is."""
    for cls in (_PassThrough, _MixedIn):
        trainer = cls(model=tiny_opt(), args=arguments(tmp_path, max_steps=1), train_dataset=TokenDataset(8))
        trainer.train()
        trainer.args.max_steps = 2
        trainer.train()
        assert trainer.zo_optimizer.steps_taken == 3, cls


def test_a_prebuilt_optimizer_warns_of_the_arguments_it_does_not_apply(tmp_path):
    model = tiny_opt()
    zo = ZOSGD(model.parameters(), lr=1e-6, seed=0)
    with pytest.warns(UserWarning, match=r"TrainingArguments' learning_rate=0.001, weight_decay=0.1 are not applied"):
        ZOTrainer(
            model=model, args=arguments(tmp_path, weight_decay=0.1), train_dataset=TokenDataset(4), zo_optimizer=zo
        )
    with warnings.catch_warnings():  # the arguments' values are the optimizer's, or the defaults: nothing unused
        warnings.simplefilter("error")
        ZOTrainer(
            model=model, args=arguments(tmp_path, learning_rate=1e-6), train_dataset=TokenDataset(4), zo_optimizer=zo
        )
        default_rate = arguments(tmp_path)
        default_rate.learning_rate = transformers.TrainingArguments.learning_rate
        ZOTrainer(model=model, args=default_rate, train_dataset=TokenDataset(4), zo_optimizer=zo)
        warm_up = ZOSGD(model.parameters(), lr=1e-3, seed=0)  # a warm-up built on it has set lr to 0 already
        schedule = torch.optim.lr_scheduler.LambdaLR(warm_up, lambda step: step / 10)
        optimizers = (None, schedule)
        ZOTrainer(model, arguments(tmp_path), None, TokenDataset(4), zo_optimizer=warm_up, optimizers=optimizers)


@pytest.mark.parametrize("options", [dict(), dict(n_probes=2)], ids=["two forwards", "four forwards"])
def test_total_flos_counts_the_forwards_the_steps_ran(tmp_path, options, monkeypatch):
    """The Trainer's estimate is a first-order step's (6 N per token, forward and backward); a ZO step runs forwards
    only, 2 N per token each, as many as its closure's calls, counted at each window's last micro-batch."""
    monkeypatch.setattr(ZOTrainer, "_takes_item_count", lambda self, model, window: True)  # (its forwards uncounted)
    model = tiny_opt()
    tokens = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: tokens.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    trainer = ZOTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=2),
        train_dataset=TokenDataset(8),
        zo_optimizer_kwargs=dict(seed=0, **options),
    )
    trainer.train()
    assert len(tokens) == 2 * 2 * 2 * options.get("n_probes", 1)  # steps x micro-batches x losses per step
    assert trainer.state.total_flos == pytest.approx(2 * model.num_parameters(exclude_embeddings=True) * sum(tokens))


def test_each_model_from_model_init_gets_its_own_optimizer(tmp_path):
    # Each train() with model_init (and each hyperparameter trial) builds a new model: the optimizer must be its own,
    # or the steps would perturb and update the previous model's tensors while the losses came from the new one.
    trainer = ZOTrainer(
        model_init=tiny_opt, args=arguments(tmp_path), train_dataset=TokenDataset(8), zo_optimizer_kwargs=dict(seed=0)
    )
    for _ in range(2):
        trainer.train()
        own = {id(p) for p in trainer.model.parameters()}
        assert all(id(p) in own for g in trainer.zo_optimizer.param_groups for p in g["params"])
        # The new model's losses see the perturbation (L+ = L- when the old model's tensors were perturbed).
        assert all(r["losses"][0] != r["losses"][1] for r in trainer.zo_optimizer.trajectory)

    own = ZOSGD(tiny_opt().parameters(), lr=1e-3)  # an optimizer given by the user cannot follow a new model: refused
    trainer = ZOTrainer(model_init=tiny_opt, args=arguments(tmp_path), train_dataset=TokenDataset(8), zo_optimizer=own)
    with pytest.raises(ValueError, match="zo_optimizer holds parameters that are not the model's"):
        trainer.train()


def test_an_interrupted_train_leaves_no_micro_batch_for_the_next(tmp_path):
    class Interrupt(transformers.TrainerCallback):
        def on_substep_end(self, args, state, control, **kwargs):  # between a window's two micro-batches
            raise KeyboardInterrupt

    trainer = ZOTrainer(
        model=tiny_opt(), args=arguments(tmp_path), train_dataset=TokenDataset(8), callbacks=[Interrupt()]
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert len(trainer._window) == 1
    trainer.remove_callback(Interrupt)
    sizes = []
    closure_over = trainer._window_closure
    trainer._window_closure = lambda model, window: sizes.append(len(window)) or closure_over(model, window)
    trainer.train()
    assert sizes == [2, 2, 2]  # each step its window's two micro-batches (the first had a third, left behind)


def _torchrun_worker(tmp_path, *mode: str) -> list[dict]:
    """tests/trainer_dp_worker.py run by torchrun as two CPU ranks; what each rank wrote, in rank order."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("trainer_dp_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "ZOKERN_BACKEND"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
    run = subprocess.run([*command, str(worker), str(tmp_path), *mode], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_data_parallel_ranks_average_a_sequence_classifiers_loss_without_the_trainers_scale(tmp_path):
    """The Trainer multiplies the loss by the number of processes for a loss divided by the global item count; a
    classifier's averages over its own batch, so each step's losses, g and update were twice too large on two
    ranks. At lr = 0 each step's loss is a mean over 16 of the 32 samples, near the whole set's."""
    ranks = _torchrun_worker(tmp_path, "classifier")
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 2
    assert all(loss == pytest.approx(ranks[0]["whole"], rel=0.2) for loss in ranks[0]["losses"])


def test_data_parallel_ranks_stay_identical_unwrapped_through_rank_zero_checkpoints(tmp_path):
    # Rank 0 alone saves, and saving reads the weights, which takes a merged step's perturbation back: every rank
    # must do so, or rank 0's next step runs other passes (bf16: other rounding) than rank 1's. And no
    # DistributedDataParallel wrapper: its gradient buckets would be as large as the trainable parameters, unused.
    ranks = _torchrun_worker(tmp_path)
    assert [r["wrapped"] for r in ranks] == ["LlamaForCausalLM"] * 2
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_fsdp2_sharded_training_checkpoints_and_resumes_as_the_replicated_run(tmp_path):
    """accelerate's FSDP2 (forced on the CPU) shards the model after the optimizer is built and swaps its parameters
    for the DTensors; the Trainer checkpointed an FSDP optimizer through get_optimizer_state_dict, which drops the ZO
    optimizer's seed and step count (refused: the first checkpoint raised). Each rank saves the ZO optimizer's state
    dict, its shards of ZOAdam's moments: the sharded run, and a run resumed from its checkpoint halfway, end bit
    for bit where the replicated run does, for a whole model (its checkpoints sharded, or gathered) and for LoRA
    adapters over a sharded frozen base, and in the exact mode for a bfloat16 model; and with bf16=True, whose policy
    ZOTrainer keeps from rounding the loss."""
    ranks = _torchrun_worker(tmp_path, "fsdp")
    assert ranks[0] == ranks[1]
    result = ranks[0]
    for name in ("full", "lora", "gathered", "exact"):
        run = result[name]
        assert run["sharded types"] == ["DTensor"], name
        assert run["exact"] == [name == "exact"] * 2, name  # (bfloat16 weights: the exact mode, sharded or not)
        assert run["sharded"] == run["replicated"] != run["start"], name
        assert {"rank0-of-2-optimizer.pt", "rank1-of-2-optimizer.pt", "scheduler.pt"} <= set(run["files"]), name
        assert run["resumed"] == run["replicated"] and run["resumed steps"] == 4, name
    # float32 shards computing in bfloat16: the losses keep float32 (accelerate's policy cast them to bfloat16, whose
    # spacing at 4 is 0.03, and some steps' L+ and L- were equal), and a resumed run ends where the run does.
    mixed = result["mixed"]
    assert mixed["policy"] == ["torch.bfloat16", "None"] and mixed["dtypes"] == ["torch.float32"]
    losses = [loss for step in mixed["losses"] for loss in step]
    assert len(losses) == 8 and all(float(torch.tensor(loss).bfloat16()) != loss for loss in losses)
    assert mixed["resumed"] == mixed["sharded"] != result["full"]["start"]
    assert "pytorch_model_fsdp_0" in result["full"]["files"]  # each rank's shards (torch.distributed.checkpoint)
    assert "model.safetensors" in result["gathered"]["files"]
    # On another number of ranks (each rank reads all the files; tests/test_fsdp.py checks the rows ZOAdam's
    # moments take): ZOSGD's state dicts, the same on every rank, resume; a rank's file twice, and missing files,
    # are refused by name.
    assert result["sgd"]["resumed"] == result["sgd"]["sharded"] != result["full"]["start"]
    assert "two state dicts saved by rank 1 were given" in result["errors"]["three"]
    assert "these are missing: rank2-of-4-optimizer.pt, rank3-of-4-optimizer.pt" in result["errors"]["four"]
    assert "FSDP2 only" in result["errors"]["fsdp1"]
    assert "was saved by a run without FSDP" in result["errors"]["replicated"]
