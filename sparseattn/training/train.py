"""Command line: ``python -m sparseattn.training.train --mode masks_only|masks_and_weights|sft ...``.

Runs under ``torchrun`` (one process per GPU; ``--seq_parallel_size P`` splits each row over P of
them, docs/parallel.md) or plain ``python``. Arguments are
:class:`ModelArguments`, :class:`DataArguments` and
:class:`~sparseattn.training.trainer.PruLongTrainingArguments` (which include every
``transformers.TrainingArguments`` option); ``--help`` lists them all.

Outputs in ``--output_dir``: ``checkpoint-N/`` folders, the final ``prulong_state.safetensors`` +
``prulong_config.json`` (and the weights, in modes that train them), ``train_log.csv``, and for
the masks modes ``head_mask_sp<end_head_sparsity>.tsv`` (gates binarized by global top-k) and
``summary.json`` (final sparsity, target, multipliers, mask file).

Example (CPU, a tiny random model, seconds)::

    python -m sparseattn.training.train --model_name_or_path tiny-random --mode masks_only --seq_len 256 \\
        --max_steps 4 --output_dir /tmp/prulong-tiny --sink_size 16 --context_window_if_toggled 32 \\
        --streaming_block_size 16
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
import transformers
from transformers import HfArgumentParser, set_seed

from ..headmask import load_head_mask, save_head_mask
from .data import ByteTokenizer, PackedDataset, pack_documents, read_records, tokenize_record
from .export import binarize
from .gates import HardConcreteGates
from .model import CONFIG_FILE, STATE_FILE, PruLongModel
from .synthetic import SyntheticRetrievalDataset
from .trainer import PruLongTrainer, PruLongTrainingArguments

logger = logging.getLogger("sparseattn")

__all__ = ["DataArguments", "ModelArguments", "build_dataset", "load_model", "main", "tiny_random_llama"]

TINY_MODEL = "tiny-random"
_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="default", metadata={
        "help": "'default' (the embedded SmolLM2-135M-Instruct), a Hugging Face model folder, a .gguf file, or "
                f"'{TINY_MODEL}' (a 2-layer random Llama with a byte tokenizer, for CI and smoke tests)"})
    model_dtype: str = field(default="auto", metadata={
        "help": "weights dtype: auto (bfloat16 for masks_only on a GPU, else float32), float32, bfloat16, float16"})
    head_mask: str | None = field(default=None, metadata={
        "help": "sft: a head-mask TSV (1 = full, 0 = streaming) fixed during training; default all heads full"})


@dataclass
class DataArguments:
    train_files: list[str] = field(default_factory=list, metadata={
        "help": "text / .jsonl / .json / .parquet files or folders; none = synthetic retrieval data only"})
    seq_len: int = field(default=8192, metadata={"help": "tokens per packed row"})
    synthetic_samples: int = field(default=0, metadata={
        "help": "synthetic passkey rows to add (default with no train_files: enough for max_steps)"})
    synthetic_max_needles: int = field(default=4, metadata={"help": "needles per synthetic row: 1..N"})
    synthetic_loss: str = field(default="answers", metadata={"help": "synthetic rows: loss on 'answers' or 'all'"})
    chat_template: bool = field(default=False, metadata={"help": "wrap SFT prompts in the tokenizer's chat template"})
    max_records: int | None = field(default=None, metadata={"help": "read at most this many records from files"})


def tiny_random_llama(seed: int = 0, vocab_size: int = ByteTokenizer.vocab_size) -> transformers.LlamaForCausalLM:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads) with random weights, for CI."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=32768,
                                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def load_model(model_args: ModelArguments, args: PruLongTrainingArguments):
    """``(model, tokenizer)`` on the CPU (the Trainer places it), in the requested dtype."""
    if model_args.model_dtype not in _DTYPES:
        raise ValueError(f"model_dtype must be one of {list(_DTYPES)}, got {model_args.model_dtype!r}")
    dtype = _DTYPES[model_args.model_dtype]
    if dtype is None:
        # Frozen weights need no fp32 master copy. FSDP needs one dtype per flat parameter (the gates are fp32).
        frozen_bf16 = args.mode == "masks_only" and torch.cuda.is_available() and not args.fsdp
        dtype = torch.bfloat16 if frozen_bf16 else torch.float32
    if model_args.model_name_or_path == TINY_MODEL:
        return tiny_random_llama(args.seed).to(dtype), ByteTokenizer()
    from ..models import load_llama

    return load_llama(model_args.model_name_or_path, dtype=dtype, device="cpu")


def build_dataset(data_args: DataArguments, args: PruLongTrainingArguments, tokenizer):
    """Packed rows from ``train_files`` plus synthetic retrieval rows (see :class:`DataArguments`)."""
    parts = []
    if data_args.train_files:
        docs = []
        for record in read_records(data_args.train_files, data_args.max_records):
            if args.mode == "sft" and "text" in record:
                raise ValueError("mode=sft takes the loss on answers only, so its data must be prompt/answer records "
                                 "(or input_ids with labels); found a 'text' record")
            docs.append(tokenize_record(record, tokenizer, chat_template=data_args.chat_template))
        rows = pack_documents(docs, data_args.seq_len, getattr(tokenizer, "pad_token_id", None) or 0)
        if not rows:
            raise ValueError(f"no training rows from {data_args.train_files}")
        parts.append(PackedDataset(rows))
        logger.info("sparseattn: %d documents packed into %d rows of %d tokens", len(docs), len(rows),
                    data_args.seq_len)
    samples = data_args.synthetic_samples
    if not parts and samples == 0:
        if args.max_steps <= 0:
            raise ValueError("with neither --train_files nor --synthetic_samples, give --max_steps to size the "
                             "synthetic data")
        data_parallel_size = max(1, args.world_size) // args.seq_parallel_size  # SP ranks share their rows
        samples = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * \
            data_parallel_size
    if samples:
        if args.mode == "sft" and data_args.synthetic_loss != "answers":
            raise ValueError("mode=sft takes the loss on answers only; use --synthetic_loss answers")
        parts.append(SyntheticRetrievalDataset(tokenizer, data_args.seq_len, samples, seed=args.seed,
                                               max_needles=data_args.synthetic_max_needles,
                                               loss_on=data_args.synthetic_loss))
    return parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)


def _setup_logging(args: PruLongTrainingArguments) -> None:
    level = logging.INFO if args.should_log else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    transformers.utils.logging.set_verbosity(level)


def _summary(trainer: PruLongTrainer, args: PruLongTrainingArguments) -> dict:
    """Final numbers, read back from the saved state (right under FSDP, where live parameters are shards)."""
    out = Path(args.output_dir)
    summary = {"mode": args.mode, "global_step": trainer.state.global_step, "max_steps": trainer.state.max_steps,
               "log_csv": str(trainer.csv_log.path)}
    config = json.loads((out / CONFIG_FILE).read_text())
    if args.mode == "sft":
        summary["head_mask_sparsity"] = float(1.0 - torch.tensor(config["head_mask"]).float().mean())
        return summary
    state = safetensors.torch.load_file(str(out / STATE_FILE))
    gates = HardConcreteGates(*state["log_alpha"].shape, temperature=config["temperature"],
                              stretch=tuple(config["stretch"]))
    with torch.no_grad():
        gates.log_alpha.copy_(state["log_alpha"])
        summary.update(target_sparsity=trainer.target_sparsity(max(0, trainer.state.global_step - 1)),
                       expected_sparsity=float(gates.expected_sparsity()),
                       deterministic_sparsity=float(gates.deterministic_sparsity()),
                       lambda1=float(state["lambda1"]), lambda2=float(state["lambda2"]))
    mask = binarize(state["log_alpha"], args.end_head_sparsity)
    mask_path = out / f"head_mask_sp{args.end_head_sparsity:g}.tsv"
    save_head_mask(mask, mask_path)
    summary.update(head_mask=str(mask_path), head_mask_sparsity=float(1.0 - mask.float().mean()),
                   streaming_heads=int((~mask).sum()), num_heads=mask.numel())
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    """Parse arguments, train, save, export; returns the summary (also written to ``summary.json``) on the
    process that saves, None on the others."""
    parser = HfArgumentParser((ModelArguments, DataArguments, PruLongTrainingArguments))
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    _setup_logging(args)
    set_seed(args.seed)
    model, tokenizer = load_model(model_args, args)
    head_mask = None
    if model_args.head_mask is not None:
        if args.mode != "sft":
            raise ValueError("--head_mask fixes the heads, so it is for --mode sft; the masks modes learn them")
        head_mask = load_head_mask(model_args.head_mask)
    prulong = PruLongModel(model, mode=args.mode, sink=args.sink_size, window=args.context_window_if_toggled,
                           block_size=args.streaming_block_size, gate_init=args.gate_init, head_mask=head_mask,
                           linear_term=not args.disable_linear_regularization_term,
                           base_model=model_args.model_name_or_path)
    dataset = build_dataset(data_args, args, tokenizer)
    trainer = PruLongTrainer(prulong, args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    summary = None
    if args.should_save:
        summary = _summary(trainer, args)
        (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        logger.info("sparseattn: %s", json.dumps(summary))
    _shut_down_distributed()
    return summary


def _shut_down_distributed() -> None:
    """Meet every rank, then tear the process group down before the interpreter exits.

    Left to interpreter shutdown, gloo's threads could be destroyed while a peer was still closing its
    sockets; CI saw a rank abort that way ("terminate called without an active exception") after
    training had finished.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
