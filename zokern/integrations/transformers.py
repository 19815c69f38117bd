"""``ZOTrainer``: the Hugging Face ``transformers.Trainer`` (5.x) running a zokern ZO optimizer.

The Trainer's loop is kept: data, logging, evaluation, checkpointing, schedulers, callbacks. What changes is the
step. ``training_step`` collects the micro-batches of one gradient-accumulation window; on its last one it takes one
ZO step whose closure evaluates all of them at the same perturbation (one z per window) and combines their losses as
the Trainer's own steps would (token-weighted through ``num_items_in_batch`` where the loss takes it).
The Trainer's own ``optimizer.step()`` that follows is then a no-op (the optimizer it holds is a thin view of the ZO
optimizer's groups and state), so learning-rate schedulers, checkpoints and resumption work unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import inspect
import os
import re
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache
from transformers import Trainer
from transformers import TrainerCallback
from transformers import trainer as trainer_module

from zokern.optim import ZOSGD
from zokern.optim import ZOOptimizer
from zokern.optim import _distributed
from zokern.optim._shards import ShardingMismatch
from zokern.optim.base import sixteen_bit_loss_message


class _ReadThrough:
    """An attribute of the wrapper that is the ZO optimizer's attribute of the same name, once ``zo`` is set (until
    then, during torch's ``Optimizer.__init__``, the wrapper's own)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, wrapper, owner=None):
        if wrapper is None:
            return self
        zo = wrapper.__dict__.get("zo")
        return wrapper.__dict__[self.name] if zo is None else getattr(zo, self.name)

    def __set__(self, wrapper, value) -> None:
        zo = wrapper.__dict__.get("zo")
        if zo is None:
            wrapper.__dict__[self.name] = value
        else:
            setattr(zo, self.name, value)


class _AlreadyStepped(torch.optim.Optimizer):
    """What the Trainer holds: the ZO optimizer's param groups and state, whose step() does nothing because
    ZOTrainer.training_step has already taken the step. state_dict and load_state_dict are the ZO optimizer's."""

    def __init__(self, zo: ZOOptimizer) -> None:
        super().__init__([p for g in zo.param_groups for p in g["params"]], dict(zo.defaults))
        self.zo = zo
        self.taken = False  # set by ZOTrainer.training_step when it took the window's ZO step
        self._warned = False

    # Read from the ZO optimizer on every access, never held: its load_state_dict (which accelerate calls when it
    # wraps this optimizer, and a resume calls) replaces these objects, and a scheduler changing lr here must change
    # it for the ZO steps.
    param_groups = _ReadThrough("param_groups")
    state = _ReadThrough("state")

    def step(self, closure=None):  # noqa: D102 - see the class docstring
        if not self.taken and not self._warned:
            # A subclass's training_step that does not call ZOTrainer's (a first-order body kept from another
            # trainer) would log losses and save checkpoints of a model that never moves.
            self._warned = True
            warnings.warn(
                "zokern: the Trainer stepped its optimizer, but no ZO step was taken for this window: a training_step "
                "override that does not call ZOTrainer.training_step trains nothing",
                UserWarning,
                stacklevel=2,
            )
        self.taken = False
        return None

    def state_dict(self) -> dict[str, Any]:
        return self.zo.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.zo.load_state_dict(state_dict)


class _WeightsAtTrainEnd(TrainerCallback):
    def __init__(self, trainer: ZOTrainer) -> None:
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.zo_optimizer is not None:
            self.trainer.zo_optimizer.materialize()


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` whose steps are zeroth-order.

    Args:
        zo_optimizer: an optimizer from :mod:`zokern.optim` over the model's parameters; or None to build
            ``zo_optimizer_cls(param_groups, lr=args.learning_rate, **zo_optimizer_kwargs)`` with the Trainer's
            weight-decay grouping (no decay on biases and norms).
        zo_optimizer_cls: default :class:`zokern.optim.ZOSGD`.
        zo_optimizer_kwargs: e.g. ``{"eps": 1e-3, "seed": 0}``; the learning rate and weight decay come from
            ``args`` (``learning_rate``, ``weight_decay``), as for the Trainer's own optimizer.
        Other arguments as ``transformers.Trainer`` (``optimizer_cls_and_kwargs`` must not be given, nor an
        optimizer in ``optimizers``; a scheduler there must be built on ``zo_optimizer``). A prebuilt
        ``zo_optimizer``, or one a ``create_optimizer`` override builds, keeps its groups' lr (which the schedule
        scales) and weight_decay.

    ``args.gradient_accumulation_steps`` = k makes one ZO step per k micro-batches, all evaluated under the same
    perturbation, their losses combined as the Trainer combines them: each divided by the window's item count
    (``num_items_in_batch``, which a model's loss or ``compute_loss_func`` takes: a micro-batch with few labelled
    tokens counts for few), else each batch's mean divided by k. Whether a model's loss takes the count is told by
    one micro-batch's loss with its count and with twice it, once per trainer: a head whose forward accepts
    ``**kwargs`` but averages regardless (sequence classification) gets the mean, not the sum, of its k means
    (``transformers.Trainer`` sums them: a first-order step k times too large). The forwards run with the model in
    eval mode (dropout off), as MeZO's. The logged training loss is the steps' loss, as the optimizer's ``step``
    returns it.
    ``args``' learning-rate schedule (warmup included) sets the ZO optimizer's lr. Its first-order optimizer
    arguments (``optim``, ``optim_args``, ``adam_*``, ``max_grad_norm``) and NEFTune's noise (added in train mode only)
    have no effect: a warning names any that are set, and no gradient norm is logged. With ``fp16=True`` on a GPU the
    forwards run under fp16 autocast without the GradScaler (there is no backward to scale; a non-finite loss skips
    the update, counted by the optimizer's ``nonfinite_steps``).

    With ``zo_optimizer_kwargs={"cuda_graph": True, ...}`` each window is copied into static input tensors that one
    closure reads, so that the step is captured once and replayed; a window of other shapes (pad to a fixed length:
    ``padding="max_length"``) gets new tensors and a new closure, which is captured anew.
    """

    def __init__(
        self,
        *args,
        zo_optimizer: ZOOptimizer | None = None,
        zo_optimizer_cls: type[ZOOptimizer] = ZOSGD,
        zo_optimizer_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        # The Trainer's arguments by name, positional ones too, in the order of the __init__ they go to next (a
        # combined class's other Trainer may order them otherwise); not validated here (a deprecated keyword the
        # Trainer still takes, that other class's own keywords).
        parameters = list(inspect.signature(super().__init__).parameters.values())
        if any(p.kind is p.VAR_POSITIONAL for p in parameters):  # (a subclass handing *args on to the Trainer)
            parameters = list(inspect.signature(Trainer.__init__).parameters.values())[1:]
        positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        given = {**dict(zip(positional, args)), **kwargs}
        optimizers = given.get("optimizers") or (None, None)
        if optimizers[0] is not None:
            raise ValueError("ZOTrainer builds its optimizer: pass zo_optimizer=..., not optimizers=(...)")
        if given.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(
                "ZOTrainer builds its optimizer: pass zo_optimizer_cls and zo_optimizer_kwargs, not "
                "optimizer_cls_and_kwargs"
            )
        if zo_optimizer is not None and not isinstance(zo_optimizer, ZOOptimizer):
            raise TypeError(f"zo_optimizer must be a zokern.optim optimizer, got {type(zo_optimizer).__name__}")
        if not (isinstance(zo_optimizer_cls, type) and issubclass(zo_optimizer_cls, ZOOptimizer)):
            raise TypeError(f"zo_optimizer_cls must be a zokern.optim optimizer class, got {zo_optimizer_cls!r}")
        for key, argument in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
            if key in (zo_optimizer_kwargs or {}):  # the Trainer's schedule and decay grouping set these
                raise ValueError(f"set {key} through TrainingArguments({argument}=...), not zo_optimizer_kwargs")
        _check_scheduler(optimizers[1], zo_optimizer)
        super().__init__(*args, **kwargs)
        self.zo_optimizer = zo_optimizer
        self._zo_built = False  # whether this trainer built zo_optimizer (and may build it anew for a new model)
        self._zo_cls = zo_optimizer_cls
        self._zo_kwargs = dict(zo_optimizer_kwargs or {})
        self._window: list[dict[str, Any]] = []
        self._loss_takes_item_count: bool | None = None  # told by _takes_item_count at the first window of several
        self._static: _StaticWindow | None = None  # with a graph-capturing optimizer: the inputs its closure reads
        self._static_rebuilds = 0
        self._warned: set[str] = set()
        self._stepped: _AlreadyStepped | None = None  # the optimizer the Trainer steps (create_optimizer's)
        # FLOPs: the closure's calls (one forward per micro-batch each), and the first-order estimate of the window's
        # micro-batches so far (see floating_point_ops).
        self._closure_calls = 0
        self._window_calls = 0
        self._window_first_order_flos = 0.0
        # First among the callbacks: at the end of training, before the user's read the weights, a merged step's
        # pending perturbation is taken back (train() takes it back again after, for whatever reads them next).
        self.callback_handler.callbacks.insert(0, _WeightsAtTrainEnd(self))
        if zo_optimizer is not None:
            self._warn_of_unused_arguments(zo_optimizer)

    def __init_subclass__(cls, **kwargs) -> None:
        # A subclass's create_optimizer (a common Trainer override: per-layer learning rates, say; its own or a
        # mixin's) builds self.optimizer itself; the step needs it as zo_optimizer, and the Trainer a no-op view of it.
        super().__init_subclass__(**kwargs)
        own = cls.create_optimizer
        if own is ZOTrainer.create_optimizer or getattr(own, "_zokern_adopts", False):
            return

        @functools.wraps(own)
        def create_optimizer(self, *args, **kw):
            return self._adopt_optimizer(own(self, *args, **kw), cls)

        create_optimizer._zokern_adopts = True
        cls.create_optimizer = create_optimizer

    def _adopt_optimizer(self, built: Any, cls: type) -> torch.optim.Optimizer:
        optimizer = self.optimizer if self.optimizer is not None else built
        # ZOTrainer's own create_optimizer ran (through super()), or an earlier train() did (accelerate wraps it).
        if isinstance(optimizer, _AlreadyStepped) or isinstance(getattr(optimizer, "optimizer", None), _AlreadyStepped):
            return optimizer
        if not isinstance(optimizer, ZOOptimizer):
            self.optimizer = None
            raise TypeError(
                f"{cls.__name__}.create_optimizer built {_a(type(optimizer).__name__)}, but ZOTrainer steps a "
                "zokern.optim optimizer: build one there (the Trainer's schedule sets its lr), or drop the override "
                "and pass zo_optimizer=... or zo_optimizer_cls=..."
            )
        self.zo_optimizer, self._zo_built = optimizer, False
        self.optimizer = self._stepped = _AlreadyStepped(optimizer)
        return self.optimizer

    def _warn_of_unused_arguments(self, zo_optimizer: ZOOptimizer) -> None:
        """A prebuilt optimizer keeps its own lr and weight_decay (the schedule scales its lr), as the Trainer's
        prebuilt optimizers do: warn where the arguments set others, which would otherwise be silently unused."""
        defaults = _argument_defaults(self.args)
        unused = []
        for key, argument in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
            value = getattr(self.args, argument)
            # (a scheduler built on the optimizer has already set lr: its initial_lr is what the schedule scales)
            given = [g.get(f"initial_{key}", g[key]) for g in zo_optimizer.param_groups]
            if value != defaults.get(argument) and value not in given:
                unused.append(f"{argument}={value:g}")
        if unused:
            self._warn_once(
                f"zokern: ZOTrainer steps the zo_optimizer passed with its own param groups' lr and weight_decay: "
                f"TrainingArguments' {', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not applied (the "
                "schedule scales the groups' lr). Set them on the optimizer, or pass zo_optimizer_cls and "
                "zo_optimizer_kwargs so that ZOTrainer builds it from the arguments",
                stacklevel=4,
            )

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # Under torch.distributed the ranks average losses, never gradients: a DistributedDataParallel wrapper would
        # only allocate gradient buckets as large as the trainable parameters. The model is prepared as accelerate
        # prepares one for evaluation (device placement, mixed precision, torch.compile), not wrapped.
        prepare_model = self.accelerator.prepare_model

        def prepare_unwrapped(model, device_placement=None, evaluation_mode=False):
            return prepare_model(model, device_placement=device_placement, evaluation_mode=True)

        self.accelerator.prepare_model = prepare_unwrapped
        # fp16 autocast on a GPU comes with a GradScaler, which scales the loss for backward() and skips a step whose
        # gradients overflowed: a ZO step has neither (stepping through the scaler raised after the first step, its
        # update already applied). Autocast itself stays; a non-finite loss skips the ZO update (nonfinite_steps).
        self.accelerator.scaler = None

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        # Rank 0 alone writes a checkpoint, and reading the weights takes a merged step's pending perturbation back,
        # which writes them: every rank takes it back here, so that all ranks run the same passes.
        if self.zo_optimizer is not None:
            self.zo_optimizer.materialize()
        return super()._save_checkpoint(model, trial, *args, **kwargs)

    # PEFT's load_adapter, which the Trainer calls to resume or to load the best checkpoint of a PEFT model, casts
    # 16-bit adapter weights to float32 (autocast_adapter_dtype): a resumed run would train float32 adapters, in
    # another perturbation and rounding mode, and end elsewhere than the run it continues. The model keeps the dtypes
    # it was built with (the checkpoint's values, saved in them, convert back exactly).
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_fsdp_enabled:
            _check_sharded_checkpoint(resume_from_checkpoint)
        with _keeping_dtypes(self.model if model is None else model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        with _keeping_dtypes(self.model):
            return super()._load_best_model()

    # Under FSDP the Trainer checkpoints its optimizer through torch.distributed.checkpoint's
    # get_optimizer_state_dict, which keeps only 'state' and 'param_groups' (the ZO optimizer refuses it: its 'zo'
    # entry holds the run's seed and step count). Each rank saves the ZO optimizer's own state dict instead, which
    # holds the rank's shards of the per-parameter states; the model and the scheduler are saved as the Trainer does.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not (self.is_fsdp_enabled and self.zo_optimizer is not None):
            return super()._save_optimizer_and_scheduler(output_dir)
        plugin = self.accelerator.state.fsdp_plugin
        trainer_module.save_fsdp_model(
            plugin, self.accelerator, self.model, output_dir, **trainer_module.get_fsdp_ckpt_kwargs()
        )
        os.makedirs(output_dir, exist_ok=True)
        mine = _rank_file(output_dir, self.args.process_index, self.args.world_size)
        torch.save(self.zo_optimizer.state_dict(), mine)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, trainer_module.SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        saved_by = None if checkpoint is None else _rank_files_world_size(checkpoint)
        if saved_by is None or self.zo_optimizer is None:  # (the Trainer's own files, if any)
            if checkpoint is None or self.zo_optimizer is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            saved = os.path.join(checkpoint, trainer_module.OPTIMIZER_NAME)
            instead = (
                f"load its weights into a new run instead (from_pretrained({checkpoint!r}), trained without "
                "resume_from_checkpoint)"
            )
            # The Trainer loads the optimizer only with the scheduler, and without either goes on with new ones.
            missing = [name for name in (trainer_module.OPTIMIZER_NAME, trainer_module.SCHEDULER_NAME)
                       if not os.path.isfile(os.path.join(checkpoint, name))]  # fmt: skip
            if missing:
                raise ValueError(
                    f"{checkpoint} holds no {' nor '.join(missing)} (saved with save_only_model=True?): resumed, the "
                    "ZO optimizer would draw its seeds from step 0 again, repeating the run's perturbations, and the "
                    f"lr schedule would start over; {instead}"
                )
            try:
                return super()._load_optimizer_and_scheduler(checkpoint)
            except ValueError as e:
                if "no 'zo' entry" not in str(e):
                    raise
                raise ValueError(
                    f"{saved} is not a zokern optimizer's state dict (a first-order Trainer's checkpoint?): a ZO run "
                    f"resumes from its own checkpoints; {instead}"
                ) from e
        world = self.args.world_size
        mine = _rank_file(checkpoint, self.args.process_index, world)
        loaded = False
        if self.is_fsdp_enabled and saved_by == world and os.path.isfile(mine):  # its own, if sharded as saved
            device = self.args.device  # (on the CPU, accelerate's cpu:0, which torch.load does not take)
            saved = torch.load(mine, map_location="cpu" if device.type == "cpu" else device, weights_only=True)
            try:
                self.zo_optimizer.load_state_dict(saved)
                loaded = True
            except ShardingMismatch:  # the same number of ranks, another mesh
                pass
        if not loaded:
            # Another number of ranks, another mesh, or none (a run without FSDP): each per-parameter state takes
            # this rank's rows from the files that hold them, read one at a time.
            files = [_rank_file(checkpoint, r, saved_by) for r in range(saved_by)]
            missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
            if missing:
                raise ValueError(
                    f"{checkpoint} holds the ZO optimizer's state dicts of {saved_by} ranks, resumed on {world}: "
                    f"each rank reads all of them, and these are missing: {', '.join(missing)}"
                )
            saved = (torch.load(f, map_location="cpu", weights_only=True) for f in files)
            self.zo_optimizer.load_sharded_state_dict(saved)
        scheduler = os.path.join(checkpoint, trainer_module.SCHEDULER_NAME)
        if os.path.isfile(scheduler):
            with warnings.catch_warnings(record=True) as caught:  # (the Trainer hides the scheduler's warnings too)
                self.lr_scheduler.load_state_dict(torch.load(scheduler, weights_only=True))
            trainer_module.reissue_pt_warnings(caught)

    def save_model(self, *args, **kwargs):
        if self.zo_optimizer is not None:  # as _save_checkpoint: called on every rank, writes on one
            self.zo_optimizer.materialize()
        return super().save_model(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            ignored = _first_order_arguments(self.args)
            if ignored:
                self._warn_once(
                    f"zokern: ZOTrainer ignores the first-order optimizer arguments {', '.join(ignored)}: its step is "
                    "the ZO optimizer's (pass its options as zo_optimizer_kwargs) and there are no gradients to clip"
                )
            opt_model = self.model if model is None else model
            if self.zo_optimizer is not None and not _holds_only_parameters_of(self.zo_optimizer, opt_model):
                # model_init built a new model (each train() and hyperparameter trial does): the optimizer would
                # perturb and update the old one's tensors while the losses came from the new one.
                if not self._zo_built:
                    raise ValueError(
                        "zo_optimizer holds parameters that are not the model's (model_init builds a new model for "
                        "each train()): pass zo_optimizer_cls and zo_optimizer_kwargs instead, so that ZOTrainer "
                        "builds the optimizer for each model"
                    )
                self.zo_optimizer = None
            if self.zo_optimizer is None:
                decay = set(self.get_decay_parameter_names(opt_model))
                named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
                groups = [
                    {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                    {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
                ]
                groups = [g for g in groups if g["params"]]
                self.zo_optimizer = self._zo_cls(groups, lr=self.args.learning_rate, **self._zo_kwargs)
                self._zo_built = True
            self.optimizer = self._stepped = _AlreadyStepped(self.zo_optimizer)
        return self.optimizer

    def train(self, *args, **kwargs):
        """``Trainer.train``; afterwards the model holds its true weights even with ``merge_steps=True`` (whose steps
        leave the next perturbation in them), for whatever reads them directly next (PEFT's merge_and_unload, say)."""
        self._check_fsdp_version()
        self._keep_float32_losses()
        self._window = []  # micro-batches an interrupted train() left behind belong to no step of this one
        self._window_first_order_flos = 0.0
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.zo_optimizer is not None:
                self.zo_optimizer.materialize()

    def _check_fsdp_version(self) -> None:
        # The ZO optimizers train FSDP2's DTensor shards; FSDP1 would wrap the model in flat parameters, which ZOTrainer
        # never does (it prepares the model unwrapped, as for evaluation): the run would hold the whole model.
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) != 2:
            raise ValueError(
                "ZOTrainer shards a model with FSDP2 only: set fsdp_config={'fsdp_version': 2} (accelerate >= 1.6; "
                "FSDP1's flat parameters are not supported)"
            )

    def _keep_float32_losses(self) -> None:
        # accelerate's FSDP2 mixed precision casts the root module's outputs to the 16-bit compute dtype
        # (output_dtype), the loss the model computed in float32 included: L+ - L- is then quantised to the loss's
        # bf16 spacing (0.016 at a loss of 3) and g often 0. Without output_dtype, outputs keep the dtype they
        # were computed in (the logits 16-bit, the loss float32). Set before train() prepares (shards) the model.
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        policy = getattr(plugin, "mixed_precision_policy", None)
        if self.is_fsdp_enabled and getattr(policy, "output_dtype", None) in (torch.bfloat16, torch.float16):
            plugin.mixed_precision_policy = dataclasses.replace(policy, output_dtype=None)

    # No gradients exist: nothing to clip, and no gradient norm to log (the Trainer's would read 0.0).
    def _clip_grad_norm(self, model):
        return None

    def _get_grad_norm(self, model, grad_norm=None):
        return None

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        # The window's item count travels with each micro-batch, so that static inputs (cuda_graph) hold it too.
        self._window.append({**self._prepare_inputs(inputs), _NUM_ITEMS: num_items_in_batch})
        if not self.accelerator.sync_gradients:
            # Not the window's last micro-batch: its loss is counted in the window's mean, returned at the end.
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        was_training = model.training
        model.eval()
        try:
            # Asked once where the answer matters: several micro-batches, or several processes (whose loss the
            # Trainer scales by their number, right only for a loss divided by the global item count).
            several = len(window) > 1 or self.accelerator.num_processes > 1
            if several and self._loss_takes_item_count is None:
                self._loss_takes_item_count = self._takes_item_count(model, window)
            closure = None
            if getattr(self.zo_optimizer, "cuda_graph", False):
                closure = self._static_closure(model, window)
            if closure is None:
                closure = self._window_closure(model, window)
            calls = self._closure_calls
            loss = self.zo_optimizer.step(closure)
            self._window_calls = self._closure_calls - calls
            if not self._window_calls:  # a captured step replays without calling the closure
                self._window_calls = type(self.zo_optimizer)._losses_per_step(self.zo_optimizer.options(), {})
            if self._stepped is not None:  # (None when training_step is called outside train())
                self._stepped.taken = True
        finally:
            model.train(was_training)
        steps = self.args.torch_empty_cache_steps  # as Trainer.training_step does
        if steps is not None and self.state.global_step % steps == 0:
            clear_device_cache()
        return loss.to(self.args.device)

    def _static_closure(self, model, window: list[dict[str, Any]]):
        """The one closure over static inputs holding this window, for a graph-capturing optimizer; None (with a
        warning, once) for a window that cannot be held so: its steps run uncaptured."""
        signature = _signature(window)
        if signature is None:
            self._warn_once(
                "zokern: ZOTrainer cannot copy this batch into static inputs (only plain tensors and scalars can be); "
                "its steps run without the CUDA graph"
            )
            return None
        if self._static is None or not self._static.fits(signature, model):
            if self._static is not None:
                self._static_rebuilds += 1
                if self._static_rebuilds == 3:
                    self._warn_once(
                        "zokern: ZOTrainer's batches keep changing shape, so cuda_graph captures nothing (each new "
                        f"shape starts over); this window: {signature}. Pad to a fixed length (padding='max_length') "
                        "and drop the last partial batch (dataloader_drop_last=True)"
                    )
            self._static = _StaticWindow(window, signature, model, self._window_closure)
        self._static.load(window)
        return self._static.closure

    def _warn_once(self, message: str, stacklevel: int = 3) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, UserWarning, stacklevel=stacklevel)

    def _takes_item_count(self, model, window: list[dict[str, Any]]) -> bool | None:
        """Whether the model's loss divides by ``num_items_in_batch`` (transformers' token-level losses: causal and
        masked LM), rather than averaging over its batch whatever it is passed: its loss given twice the count is
        then not the same. Two forwards per micro-batch until one has items to count (one whose labels are all
        ignored gives 0 either way); None if none has, to ask again at the next window. Under torch.distributed the
        ranks decide together (one small all_reduce), since each probes its own micro-batches."""
        items = window[0][_NUM_ITEMS]  # the window's count: the same for each of its micro-batches
        if not self.model_accepts_loss_kwargs or items is None or self.compute_loss_func is not None:
            return False  # never passed a count, or a compute_loss_func's own affair: nothing to tell (every rank)
        answer = -1  # not told: every micro-batch's loss was 0 (or not finite) with either count
        # Each forward from torch's random state as it is, left as it was: a loss that samples (token dropout, an
        # augmentation) must draw the same for both counts, and the run the same as without the probe (a resumed
        # run probes at another step than the run it resumes).
        fork = _random_state_fork(model, self.args.n_gpu)
        for entry in window:
            batch = {k: v for k, v in entry.items() if k != _NUM_ITEMS}
            with torch.no_grad(), self.compute_loss_context_manager():
                with fork():
                    once = self.compute_loss(model, dict(batch), num_items_in_batch=items)
                with fork():
                    twice = self.compute_loss(model, dict(batch), num_items_in_batch=items * 2)
            if self.args.n_gpu > 1:  # nn.DataParallel's one loss per GPU, as the closure takes their mean
                once, twice = once.mean(), twice.mean()
            if once.numel() != 1:  # not a loss: the step's closure says why
                answer = 0
                break
            if bool(torch.isfinite(once)) and once.item() != 0:
                answer = int(not torch.equal(once, twice))
                break
        answer = _distributed.max_across_ranks(answer)  # one rank told "divides" is enough
        return None if answer < 0 else bool(answer)

    def floating_point_ops(self, inputs: dict[str, Any]) -> float:
        """The FLOPs of the forwards this micro-batch's ZO step ran, which the Trainer adds up in ``total_flos``: its
        estimate is a first-order step's, forward and backward (6 N per token), a ZO step's is forwards only (2 N per
        token each), as many as the closure's calls (2 for ZOSGD, K + 1 for LDSD, ...). The Trainer asks after each
        micro-batch: a window's are counted at its last, after its step (a one-time probe's forwards are not)."""
        self._window_first_order_flos += super().floating_point_ops(inputs)
        if self._window:  # the window's step is still to come
            return 0
        flos, self._window_first_order_flos = self._window_first_order_flos / 3 * self._window_calls, 0.0
        return flos

    def _window_closure(self, model, window: list[dict[str, Any]]):
        def closure() -> torch.Tensor:
            self._closure_calls += 1
            total = None
            with self.compute_loss_context_manager():
                for entry in window:
                    batch = dict(entry)  # a copy per call: compute_loss may pop keys (labels) from its dict
                    items = batch.pop(_NUM_ITEMS)
                    if self._loss_takes_item_count is False and self.compute_loss_func is None:
                        # A loss that averages over its own batch (a sequence classifier's): given no count, the
                        # Trainer does not scale it by the number of processes, whose mean the step then takes.
                        items = None
                    loss = self.compute_loss(model, batch, num_items_in_batch=items).detach()
                    # A loss is one number, or one per GPU that nn.DataParallel (one process) gathered (shape (n,) or
                    # (n, 1)); the first output of a model that computed no loss (no labels?) is something else.
                    per_gpu = self.args.n_gpu > 1 and loss.dim() == 2 and loss.shape[1] == 1
                    if not (0 < loss.numel() <= max(1, self.args.n_gpu) and (loss.dim() <= 1 or per_gpu)):
                        why = (
                            "one loss per example or token? reduce them to one (.mean())"
                            if "labels" in entry
                            else "the model computed none from this batch (labels missing?)"
                        )
                        raise ValueError(
                            f"compute_loss returned a tensor of shape {tuple(loss.shape)}, not a loss: {why} (the "
                            f"batch's keys: {', '.join(sorted(batch))})"
                        )
                    if self.args.n_gpu > 1:
                        loss = loss.mean()
                    if loss.dtype in (torch.bfloat16, torch.float16):  # summed in float32 below, it would not warn
                        self._warn_once(sixteen_bit_loss_message("compute_loss", loss.dtype))
                    loss = loss.float()
                    # As Trainer.training_step: a loss that took the item count is already the window's share.
                    if not self._loss_takes_item_count and self.compute_loss_func is None:
                        loss = loss / len(window)
                    total = loss if total is None else total + loss
            return total

        return closure


class _StaticWindow:
    """Input tensors that stay the same objects from window to window, and the one closure that reads them: what a
    captured step replays. A window fits when its keys, shapes, dtypes, devices and scalar values match."""

    def __init__(self, window: list[dict[str, Any]], signature: tuple, model, make_closure) -> None:
        self.signature = signature
        self.model = model
        self.window = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in window]
        self.closure = make_closure(model, self.window)

    def fits(self, signature: tuple, model) -> bool:
        return model is self.model and signature == self.signature

    def load(self, window: list[dict[str, Any]]) -> None:
        for static, batch in zip(self.window, window):
            for key, value in batch.items():
                if isinstance(value, torch.Tensor):
                    static[key].copy_(value)


# TrainingArguments that configure the first-order optimizer, and the values of theirs that mean nothing to a ZO
# step: their defaults, and max_grad_norm 0 (no clipping).
_FIRST_ORDER_ARGUMENTS = ("optim", "optim_args", "optim_target_modules", "adam_beta1", "adam_beta2", "adam_epsilon")


@contextlib.contextmanager
def _keeping_dtypes(model: torch.nn.Module) -> Iterator[None]:
    """Parameters whose floating dtype the block changed get their dtype back, by name."""
    before = {name: p.dtype for name, p in model.named_parameters()}
    yield
    for name, p in model.named_parameters():
        dtype = before.get(name)
        if dtype is not None and p.dtype != dtype and p.is_floating_point() and dtype.is_floating_point:
            p.data = p.data.to(dtype)


def _check_sharded_checkpoint(checkpoint: str) -> None:
    """A sharded run resumes from a checkpoint a sharded run saved, whose model accelerate's FSDP saving wrote (else
    torch.distributed.checkpoint fails on missing metadata, naming neither the checkpoint nor the cause)."""
    from accelerate.utils.constants import FSDP_MODEL_NAME

    if os.path.isdir(checkpoint) and not any(FSDP_MODEL_NAME in name for name in os.listdir(checkpoint)):
        raise ValueError(
            f"{checkpoint} was saved by a run without FSDP (it holds no {FSDP_MODEL_NAME}*): resume it without FSDP, "
            "or load its weights into the model before the Trainer shards it and start a new run"
        )


def _random_state_fork(model: torch.nn.Module, n_gpu: int) -> Callable[[], Any]:
    """A context that saves torch's random states of the CPU and of the accelerator the model's parameters are on
    (each of its devices; under nn.DataParallel each of its ``n_gpu``), and gives them back on exit."""
    accelerators = {p.device.type for p in model.parameters()} - {"cpu", "meta"}
    if len(accelerators) != 1:  # the CPU's alone (or devices of several kinds: each kind's own is out of reach)
        return lambda: torch.random.fork_rng(devices=[])
    (kind,) = accelerators
    indices = {p.device.index or 0 for p in model.parameters() if p.device.type == kind} | set(range(max(n_gpu, 0)))
    return lambda: torch.random.fork_rng(devices=sorted(indices), device_type=kind)


def _rank_file(directory: str, rank: int, world: int) -> str:
    """Where rank ``rank`` of ``world`` saves the ZO optimizer's state dict in a sharded run's checkpoint (the name the
    Trainer gives its per-rank optimizer files under XLA's FSDP)."""
    return os.path.join(directory, f"rank{rank}-of-{world}-{trainer_module.OPTIMIZER_NAME}")


def _rank_files_world_size(directory: str) -> int | None:
    """The number of ranks that saved per-rank optimizer files in ``directory``, or None if none did."""
    pattern = re.compile(rf"rank\d+-of-(\d+)-{re.escape(trainer_module.OPTIMIZER_NAME)}")
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "rank*-of-*"))):
        found = pattern.fullmatch(os.path.basename(path))
        if found:
            return int(found.group(1))
    return None


def _check_scheduler(scheduler: Any, zo_optimizer: ZOOptimizer | None) -> None:
    """A scheduler given in ``optimizers=(None, scheduler)`` sets the lr of the optimizer it was built on: on any
    other than the one ZOTrainer steps, the steps keep a constant lr while the Trainer logs the scheduler's."""
    if scheduler is None:
        return
    if zo_optimizer is None:
        raise ValueError(
            "optimizers=(None, scheduler) with no zo_optimizer: the scheduler sets the lr of the optimizer it was "
            "built on, not of the one ZOTrainer builds. Pass zo_optimizer=... and a scheduler built on it, or set "
            "the schedule with TrainingArguments(lr_scheduler_type=..., warmup_steps=...)"
        )
    built_on = getattr(scheduler, "optimizer", zo_optimizer)  # (a scheduler of one's own may not say)
    if built_on is not zo_optimizer:
        raise ValueError(
            f"the scheduler in optimizers=(None, scheduler) was built on {_a(type(built_on).__name__)}, not on "
            "zo_optimizer: the ZO steps would keep a constant lr while the Trainer logged the scheduler's. Build it "
            "on zo_optimizer"
        )


def _a(name: str) -> str:
    return f"{'an' if name[:1] in 'AEIOU' else 'a'} {name}"


def _argument_defaults(args) -> dict[str, Any]:
    """The TrainingArguments' defaults by name: what a value differing from was set by the user."""
    return {f.name: f.default for f in dataclasses.fields(args)}


def _first_order_arguments(args) -> list[str]:
    """``name=value`` for each first-order argument the user set, which a ZO step cannot honour."""
    defaults = _argument_defaults(args)
    changed = [n for n in _FIRST_ORDER_ARGUMENTS if n in defaults and getattr(args, n) != defaults[n]]
    if args.max_grad_norm not in (0, defaults.get("max_grad_norm")):
        changed.append("max_grad_norm")
    if getattr(args, "neftune_noise_alpha", None) is not None:  # its noise is added in train mode only, which the
        changed.append("neftune_noise_alpha")  # ZO forwards are not in (independent noise would swamp L+ - L-)
    return [f"{n}={getattr(getattr(args, n), 'value', getattr(args, n))}" for n in changed]  # value: of an enum


_SCALARS = (type(None), bool, int, float, str)

# The key under which a window's micro-batch carries the Trainer's num_items_in_batch (removed before compute_loss).
_NUM_ITEMS = "zokern.num_items_in_batch"


def _signature(window: list[dict[str, Any]]) -> tuple | None:
    """What a static window must match: per batch, each key with its tensor's shape, dtype and device, or its scalar
    value; None when a value is neither a dense tensor nor a scalar (a list, an array, a sparse tensor), which
    static inputs cannot hold."""
    out = []
    for batch in window:
        described = []
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.layout == torch.strided:
                described.append((key, "tensor", tuple(value.shape), value.dtype, value.device))
            elif isinstance(value, _SCALARS):
                described.append((key, type(value).__name__, repr(value)))  # repr: a NaN equals itself
            else:
                return None
        out.append(tuple(described))
    return tuple(out)


def _holds_only_parameters_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> bool:
    own = {id(p) for p in model.parameters()}
    return all(id(p) in own for group in optimizer.param_groups for p in group["params"])
