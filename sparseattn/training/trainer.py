"""The PruLong trainer: transformers' ``Trainer`` with gates, multipliers, the schedule and a CSV log.

What it adds to ``transformers.Trainer`` (which keeps doing the rest: torchrun/DDP, FSDP via
``--fsdp``, gradient checkpointing, bf16 autocast, checkpoint rotation, resume with data skipping
and RNG restore, TensorBoard with ``--report_to tensorboard`` if installed):

- the loss: the target sparsity ``t(step)`` of :class:`~sparseattn.training.schedule.SparsitySchedule`
  goes to :class:`~sparseattn.training.model.PruLongModel`, which returns
  ``lm_loss + lambda1 (s - t) + lambda2 (s - t)^2``;
- the optimizer: parameter groups for the weights (``learning_rate``, weight decay), the gates
  (``mask_learning_rate``, no decay) and the multipliers (``reg_learning_rate``, no decay,
  ``maximize=True``: gradient ascent). The weights follow ``lr_scheduler_type``; gates and
  multipliers keep a constant rate (the sparsity schedule is their annealing);
- checkpoints: ``prulong_state.safetensors`` (gates, multipliers) + ``prulong_config.json`` in
  every checkpoint, the model weights only in modes that train them; resume restores all of it
  (before any FSDP wrapping) together with the optimizer, scheduler, RNG and data position;
- logging: ``lm_loss``, ``reg_loss``, ``sparsity`` (expected), ``sparsity_det`` (deterministic
  gates), ``target_sparsity``, ``lambda1``, ``lambda2`` in the trainer's logs and in a CSV file
  (``output_dir/train_log.csv`` by default). A resumed run drops the rows the interrupted run
  wrote after its checkpoint, so the CSV reads like one uninterrupted run.

Sequence parallelism (``seq_parallel_size`` P > 1, docs/parallel.md): the world is split into
``world / P`` data-parallel replicas of P consecutive ranks (:func:`~sparseattn.parallel.build_groups`).
The dataloaders shard rows over the replicas, not the processes, so the ranks of a replica read the
same rows; each rank keeps its ``L / P`` tokens of a row (:meth:`PruLongTrainer.sequence_parallel_inputs`),
the attention runs between Ulysses all-to-alls, and the LM loss is the token mean over the replica.
The hard-concrete noise depends only on ``(seed, global micro-batch index)``
(:meth:`PruLongTrainer.gate_generator`), so the ranks of a replica draw the same gates and a run on
P ranks equals a run on one. DDP averages the gradients over the world, as without it.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.data_loader import BatchSamplerShard
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..parallel import all_gather, build_groups, check_heads, check_seq_parallel_size, shard_batch
from .data import PackedCollator
from .gates import DEFAULT_INIT
from .model import MODES, PruLongModel, model_shape
from .schedule import SparsitySchedule

logger = logging.getLogger("sparseattn")

__all__ = ["CSV_COLUMNS", "CsvLogCallback", "PruLongTrainer", "PruLongTrainingArguments", "build_param_groups"]

CSV_COLUMNS = ("step", "epoch", "loss", "lm_loss", "reg_loss", "sparsity", "sparsity_det", "target_sparsity",
               "lambda1", "lambda2", "learning_rate", "mask_learning_rate", "grad_norm")
# Averaged over the micro-batches of a logging window; the rest are the latest value.
_MEAN_METRICS = ("lm_loss", "reg_loss", "sparsity")
_LAST_METRICS = ("sparsity_det", "target_sparsity", "lambda1", "lambda2")
_TRAINING_ARGS_NAME = "training_args.bin"


@dataclass
class PruLongTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus PruLong's knobs (the seed's names) and defaults that suit packed rows.

    Every ``transformers.TrainingArguments`` option works as usual (``--bf16``,
    ``--gradient_checkpointing``, ``--fsdp``, ``--save_steps``, ``--report_to tensorboard``, ...).
    """

    mode: str = field(default="masks_only", metadata={"help": f"one of {list(MODES)}"})
    start_head_sparsity: float = field(default=0.0, metadata={"help": "target head sparsity at step 0"})
    end_head_sparsity: float = field(default=0.5, metadata={"help": "target head sparsity after the warmup"})
    sparsity_warmup_ratio: float = field(default=0.5, metadata={"help": "fraction of steps the target moves over"})
    warmup_type: str = field(default="linear", metadata={"help": "target schedule: linear or logarithmic"})
    mask_learning_rate: float = field(default=0.05, metadata={"help": "learning rate of the gates (log_alpha)"})
    reg_learning_rate: float = field(default=4.0, metadata={"help": "learning rate (ascent) of lambda1, lambda2"})
    disable_linear_regularization_term: bool = field(default=False, metadata={"help": "freeze lambda1 at 0"})
    gate_init: float = field(default=DEFAULT_INIT, metadata={"help": "initial log_alpha (4: all heads full)"})
    sink_size: int = field(default=128, metadata={"help": "sink tokens of a streaming head"})
    context_window_if_toggled: int = field(default=1024, metadata={"help": "local window of a streaming head"})
    streaming_block_size: int = field(default=64, metadata={"help": "block size of the streaming pattern"})
    seq_parallel_size: int = field(default=1, metadata={
        "help": "sequence-parallel degree: ranks that split one row (must divide the number of processes)"})
    log_csv: str | None = field(default=None, metadata={"help": "CSV log path (default output_dir/train_log.csv)"})
    # transformers defaults changed for packed training:
    per_device_train_batch_size: int = field(default=1, metadata={"help": "packed rows per device per micro-step"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the packing columns"})
    logging_steps: float = field(default=1, metadata={"help": "log every N optimizer steps"})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "integrations (e.g. tensorboard)"})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "DDP unused-parameter search"})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        self.sparsity_schedule()  # validates the four schedule knobs
        for name in ("mask_learning_rate", "reg_learning_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        check_seq_parallel_size(self.seq_parallel_size, int(os.environ.get("WORLD_SIZE", "1")))
        if self.seq_parallel_size > 1 and self.train_sampling_strategy == "batch_rebalance":
            raise ValueError("train_sampling_strategy='batch_rebalance' shards batches over every process itself, "
                             "which sequence parallelism cannot use; choose 'random' or 'sequential'")
        # Non-reentrant checkpointing: the gates reach the layers as a keyword argument.
        for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
            if hasattr(self, name) and getattr(self, name) is None:
                setattr(self, name, {"use_reentrant": False})
                break
        super().__post_init__()

    def sparsity_schedule(self) -> SparsitySchedule:
        return SparsitySchedule(self.start_head_sparsity, self.end_head_sparsity, self.sparsity_warmup_ratio,
                                self.warmup_type)


class _Constant:
    """A picklable LambdaLR factor of 1 (gates and multipliers ignore the weights' schedule)."""

    def __call__(self, step: int) -> float:
        return 1.0


def build_param_groups(model: PruLongModel, args: PruLongTrainingArguments, decay_names: set[str]) -> list[dict]:
    """Optimizer groups: weights (with / without decay), gates, multipliers (``maximize=True``).

    Each group carries ``"prulong_group"``: ``"weights"``, ``"gates"`` or ``"multipliers"``.
    Frozen parameters (per mode) are left out.
    """
    weights_decay, weights_plain, gates, multipliers = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("gates."):
            gates.append(param)
        elif name.startswith("lagrangian."):
            multipliers.append(param)
        elif name in decay_names:
            weights_decay.append(param)
        else:
            weights_plain.append(param)
    groups = [
        {"params": weights_decay, "lr": args.learning_rate, "weight_decay": args.weight_decay,
         "prulong_group": "weights"},
        {"params": weights_plain, "lr": args.learning_rate, "weight_decay": 0.0, "prulong_group": "weights"},
        {"params": gates, "lr": args.mask_learning_rate, "weight_decay": 0.0, "prulong_group": "gates"},
        {"params": multipliers, "lr": args.reg_learning_rate, "weight_decay": 0.0, "maximize": True,
         "prulong_group": "multipliers"},
    ]
    return [g for g in groups if g["params"]]


class CsvLogCallback(TrainerCallback):
    """Appends the training logs that carry PruLong metrics to a CSV file (:data:`CSV_COLUMNS`), on rank 0.

    ``resuming`` (set by :meth:`PruLongTrainer.train`) keeps the rows from before the checkpoint
    and drops later ones; otherwise an existing file is overwritten.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.resuming = False
        self._started = False

    def _start(self, first_step: int) -> None:
        kept = []
        if self.resuming and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) < first_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        self._started = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "lm_loss" not in logs:
            return
        if not self._started:
            self._start(state.global_step)
        row = {key: logs.get(key, "") for key in CSV_COLUMNS}
        row["step"], row["epoch"] = state.global_step, state.epoch
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS).writerow(row)


def _scalar(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class PruLongTrainer(Trainer):
    """``transformers.Trainer`` for :class:`~sparseattn.training.model.PruLongModel` (see the module docstring).

    Args:
        model: the wrapper; its ``mode`` must match ``args.mode``.
        args: :class:`PruLongTrainingArguments`.
        **kwargs: ``Trainer`` arguments (``train_dataset``, ...); ``data_collator`` defaults to
            :class:`~sparseattn.training.data.PackedCollator`.
    """

    def __init__(self, model: PruLongModel, args: PruLongTrainingArguments, **kwargs):
        if not isinstance(model, PruLongModel):
            raise TypeError(f"model must be a PruLongModel, got {type(model).__name__}")
        if not isinstance(args, PruLongTrainingArguments):
            raise TypeError(f"args must be PruLongTrainingArguments, got {type(args).__name__}")
        if model.mode != args.mode:
            raise ValueError(f"the model was built for mode={model.mode!r} but args.mode={args.mode!r}")
        _, num_kv_heads, num_heads = model_shape(model.model)
        check_heads(num_heads, num_kv_heads, args.seq_parallel_size)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if args.seq_parallel_size > 1 and args.world_size != launched:
            raise ValueError(f"{launched} processes were launched, but the Trainer runs {args.world_size} of them "
                             "together; on a machine without GPUs pass --use_cpu")
        kwargs.setdefault("data_collator", PackedCollator())
        super().__init__(model=model, args=args, **kwargs)
        # Our loss is a per-micro-batch mean plus a penalty: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.schedule = args.sparsity_schedule()
        self._metrics: list[dict] = []
        self._resumed_from: str | None = None
        self._noise_step, self._micro_batch = -1, 0
        # Under torchrun the Trainer's accelerator has set torch.distributed up by now.
        self.parallel_groups = build_groups(args.seq_parallel_size)
        if self.parallel_groups.is_seq_parallel:
            # After install() (the PruLongModel did it) and before any DDP / FSDP wrapping (in train()).
            model.enable_sequence_parallel(self.parallel_groups.seq_group)
        self.csv_log = CsvLogCallback(args.log_csv or os.path.join(args.output_dir, "train_log.csv"))
        self.add_callback(self.csv_log)

    @property
    def prulong_model(self) -> PruLongModel:
        return self.accelerator.unwrap_model(self.model)

    # ---- schedule and loss ---------------------------------------------------------------------
    def target_sparsity(self, step: int | None = None) -> float | None:
        """The schedule's target at ``step`` (default: the step being computed); None in SFT."""
        if self.args.mode == "sft":
            return None
        step = self.state.global_step if step is None else step
        return self.schedule(step, max(1, self.state.max_steps or self.args.max_steps))

    def sequence_parallel_inputs(self, inputs: dict) -> dict:
        """This rank's shard of a packed row under sequence parallelism; ``inputs`` unchanged without it.

        ``input_ids`` and ``position_ids`` are padded at the end to a multiple of ``seq_parallel_size``
        and cut into consecutive shards; the labels are shifted on the whole row first (the target of
        a shard's last token lives on the next rank) and become ``shift_labels``; ``cu_seq_lens_q``
        stays the whole row's, since each rank attends over the whole row between the all-to-alls.
        """
        groups = self.parallel_groups
        if not groups.is_seq_parallel:
            return inputs
        shard = shard_batch(inputs["input_ids"], inputs.get("labels"), seq_parallel_rank=groups.seq_parallel_rank,
                            seq_parallel_size=groups.seq_parallel_size, attention_mask=inputs.get("attention_mask"),
                            position_ids=inputs.get("position_ids"), cu_seqlens=inputs.get("cu_seq_lens_q"))
        return {"input_ids": shard.input_ids, "position_ids": shard.position_ids, "cu_seq_lens_q": shard.cu_seqlens,
                "max_length_q": shard.max_seqlen,
                "shift_labels": shard.labels if inputs.get("labels") is not None else None}

    def gate_generator(self) -> torch.Generator:
        """The source of the gates' noise for the next training micro-batch.

        Seeded from ``(seed, n)`` alone, ``n`` being the micro-batch's index in the global order of
        the data (``(step x accumulation + micro-step) x data_parallel_size + data_parallel_rank``):
        the ranks of a sequence-parallel group draw the same gates (they must: one ``z`` per head per
        row), a resumed run draws what the uninterrupted one did, and ``D`` replicas draw what one
        process accumulating ``D`` micro-batches does.
        """
        step = self.state.global_step
        if step != self._noise_step:
            self._noise_step, self._micro_batch = step, 0
        groups = self.parallel_groups
        index = ((step * self.args.gradient_accumulation_steps + self._micro_batch) * groups.data_parallel_size
                 + groups.data_parallel_rank)
        self._micro_batch += 1
        # SeedSequence mixes the pair: the CPU generator keeps only 32 bits of its seed.
        seed = int(np.random.SeedSequence([self.args.seed, index]).generate_state(1)[0])
        return torch.Generator(self.args.device).manual_seed(seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self.sequence_parallel_inputs(inputs)
        generator = self.gate_generator() if model.training else None
        outputs = model(**inputs, target_sparsity=self.target_sparsity(), gate_generator=generator)
        if model.training:
            self._metrics.append({k: outputs[k] for k in _MEAN_METRICS + _LAST_METRICS})
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- data: rows are sharded over data-parallel replicas, not processes -------------------------
    def _shard_over_replicas(self, dataloader):
        # accelerate shards batches over every process (BatchSamplerShard); point it at the replicas
        # instead, as transformers itself does for its rank-aware samplers. Resuming wraps this sampler
        # (skip_first_batches), so data skipping keeps working.
        groups = self.parallel_groups
        if not groups.is_seq_parallel:
            return dataloader
        shard = getattr(dataloader, "batch_sampler", None)
        if not isinstance(shard, BatchSamplerShard):
            raise ValueError("sequence parallelism needs a map-style dataset (with __len__), read without "
                             "accelerate's dispatch_batches, so that every rank of a sequence-parallel group can "
                             f"read the same rows; got a {type(dataloader).__name__} over "
                             f"{type(dataloader.dataset).__name__}")
        shard.num_processes, shard.process_index = groups.data_parallel_size, groups.data_parallel_rank
        return dataloader

    def get_train_dataloader(self):
        return self._shard_over_replicas(super().get_train_dataloader())

    def get_eval_dataloader(self, eval_dataset=None):
        return self._shard_over_replicas(super().get_eval_dataloader(eval_dataset))

    def _gather_over_replicas(self, tensor: torch.Tensor) -> torch.Tensor:
        # gather_for_metrics, over the data-parallel group: the ranks of a replica hold the same losses.
        gathered = all_gather(tensor.contiguous(), self.parallel_groups.data_group)
        state = self.accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            gathered = gathered[:state.remainder]  # the batches accelerate repeated to even out the replicas
        return gathered

    def evaluation_loop(self, *args, **kwargs):
        if self.parallel_groups.is_seq_parallel:
            self.gather_function = self._gather_over_replicas  # the loop resets it when done
        return super().evaluation_loop(*args, **kwargs)

    def get_total_train_batch_size(self, args) -> int:
        return super().get_total_train_batch_size(args) // self.parallel_groups.seq_parallel_size

    def _track_num_input_tokens(self, inputs) -> None:
        # The Trainer adds every process's row; the ranks of a sequence-parallel group hold the same one.
        seen = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen = seen + (self.state.num_input_tokens_seen - seen) // \
            self.parallel_groups.seq_parallel_size

    # ---- optimizer and schedule ----------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.accelerator.unwrap_model(model if model is not None else self.model)
            groups = build_param_groups(opt_model, self.args, set(self.get_decay_parameter_names(opt_model)))
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            if any(g["prulong_group"] == "multipliers" for g in groups) and "maximize" not in self.optimizer.defaults:
                raise ValueError(f"optimizer {optimizer_cls.__name__} has no 'maximize' option, which the Lagrange "
                                 "multipliers need for gradient ascent; use --optim adamw_torch (the default)")
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        optimizer = optimizer if optimizer is not None else self.optimizer
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            for i, group in enumerate(optimizer.param_groups):
                if group.get("prulong_group") in ("gates", "multipliers"):
                    scheduler.lr_lambdas[i] = _Constant()
                    group["lr"] = scheduler.base_lrs[i]
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        elif any(g.get("prulong_group") in ("gates", "multipliers") for g in optimizer.param_groups):
            logger.warning("sparseattn: lr_scheduler_type %r is not a LambdaLR; the gates and multipliers follow it "
                           "too", self.args.lr_scheduler_type)
        return scheduler

    # ---- logging ---------------------------------------------------------------------------------
    def _group_lr(self, name: str) -> float | None:
        if self.optimizer is None:
            return None
        for group in self.optimizer.param_groups:
            if group.get("prulong_group") == name:
                return float(group["lr"])
        return None

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._metrics and "loss" in logs:
            for key in _MEAN_METRICS:
                values = torch.stack([torch.as_tensor(m[key], dtype=torch.float32).to(self.args.device)
                                      for m in self._metrics])
                logs[key] = _scalar(self.accelerator.reduce(values.mean(), reduction="mean"))
            for key in _LAST_METRICS:
                logs[key] = _scalar(self._metrics[-1][key])
            mask_lr = self._group_lr("gates")
            if mask_lr is not None:
                logs["mask_learning_rate"] = mask_lr
            self._metrics.clear()
        super().log(logs, *args, **kwargs)

    # ---- checkpoints -----------------------------------------------------------------------------
    def _run_record(self) -> dict:
        a = self.args
        return {"start_head_sparsity": a.start_head_sparsity, "end_head_sparsity": a.end_head_sparsity,
                "sparsity_warmup_ratio": a.sparsity_warmup_ratio, "warmup_type": a.warmup_type,
                "global_step": self.state.global_step, "max_steps": self.state.max_steps}

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.prulong_model.save_checkpoint(output_dir, state_dict=state_dict, extra_config=self._run_record())
        torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_NAME))

    def _resolve_checkpoint(self, resume_from_checkpoint) -> str | None:
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() in ("true", "last", "auto"):
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if last is None and str(resume_from_checkpoint).lower() != "auto":
                raise ValueError(f"no checkpoint to resume from in {self.args.output_dir}")
            return last
        return str(resume_from_checkpoint)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``; ``resume_from_checkpoint`` may also be ``"auto"`` (the last checkpoint, if any)."""
        path = self._resolve_checkpoint(resume_from_checkpoint)
        if path is not None:
            # Before the model is wrapped (DDP, FSDP), so every process loads the same full state.
            self.prulong_model.load_checkpoint(path)
            self._resumed_from = path
            logger.info("sparseattn: resuming from %s", path)
        self.csv_log.resuming = path is not None
        return super().train(resume_from_checkpoint=path, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if resume_from_checkpoint == self._resumed_from:
            return  # loaded in train()
        self.accelerator.unwrap_model(model if model is not None else self.model).load_checkpoint(
            resume_from_checkpoint)

