"""Sequence-parallel PruLong training (``--seq_parallel_size``) on CPU with gloo, against one process.

- masks-only through ``run_scripts/prulong_masksonly.sh`` (torchrun): 2 processes splitting every row
  (seq_parallel_size 2) against ``NPROC=1``, then the same run interrupted and resumed;
- masks-and-weights through :class:`PruLongTrainer` under torchrun (this file is the worker): 4
  processes = 2 data-parallel replicas x 2, with an evaluation, against one process accumulating 2
  micro-batches per step (the same global batch).

Each compares the per-step losses, multipliers and sparsity, the tokens seen, and the final gates,
multipliers and weights at fp32 tolerance. The tiny random Llama has 4 query / 2 KV heads; rows of 199
tokens pack several documents and are padded to 200 for the split. Launching takes most of the time
(each process imports torch and transformers): about a minute on 2 cores.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sparseattn.training.data import ByteTokenizer, PackedDataset, pack_documents, tokenize_record
from sparseattn.training.model import STATE_FILE, PruLongModel
from sparseattn.training.synthetic import corpus_files
from sparseattn.training.train import tiny_random_llama
from sparseattn.training.trainer import PruLongTrainer, PruLongTrainingArguments

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 199  # odd: sequence parallelism pads each row to 200
STEPS = 4
TIMEOUT_S = 300
DDP_TIMEOUT_S = 90  # a collective that one rank skips fails in this time instead of hanging
# The per-step numbers compared (the epoch differs: replicas pad the epoch to an even number of rows).
LOGGED = ("loss", "lm_loss", "reg_loss", "sparsity", "sparsity_det", "target_sparsity", "lambda1", "lambda2",
          "grad_norm")


def documents(n: int = 60) -> list[dict]:
    """Text records of 60..259 characters: rows of 199 tokens hold several documents, some split."""
    text = corpus_files()[0].read_text(encoding="utf-8")
    records, start = [], 0
    for i in range(n):
        length = 60 + (i * 37) % 200
        records.append({"text": text[start:start + length]})
        start += length
    return records


def close(actual, expected, name):
    """fp32 agreement after a few optimizer steps: the ranks sum in another order (seen: 1e-7 relative)."""
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=2e-5, atol=1e-6,
                               msg=lambda m: f"{name}: {m}")


def run(command: list[str], env: dict | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           **(env or {})}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{command[:4]} timed out after {TIMEOUT_S} s:\n{(exc.stdout or '')[-4000:]}")
    assert done.returncode == 0, done.stdout[-6000:]


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def tokens_seen(output_dir: Path, step: int) -> list[int]:
    state = json.loads((output_dir / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [entry["num_input_tokens_seen"] for entry in state["log_history"] if "loss" in entry]


def check_same_run(log, ref_log, state, ref_state):
    assert [row["step"] for row in log] == [row["step"] for row in ref_log] == [str(s) for s in range(1, STEPS + 1)]
    for key in LOGGED:
        close([float(row[key]) for row in log], [float(row[key]) for row in ref_log], key)
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        close(state[key], ref_state[key], key)


# --------------------------------------------------------------------------------------------
# masks-only through the run script: 2 processes, seq_parallel_size 2
# --------------------------------------------------------------------------------------------


def run_script(out: Path, data: Path, nproc: int, seq_parallel_size: int) -> None:
    env = dict(MODEL="tiny-random", SEQ_LEN=str(SEQ_LEN), STEPS=str(STEPS), SAVE_STEPS="2", SINK_SIZE="16",
               CONTEXT_WINDOW_IF_TOGGLED="32", BLOCK_SIZE="16", NPROC=str(nproc),
               SEQ_PARALLEL_SIZE=str(seq_parallel_size), BF16="0", MASK_LEARNING_RATE="0.2", TRAIN_FILES=str(data),
               OUT=str(out), PYTHON=sys.executable)
    run(["bash", str(ROOT / "run_scripts" / "prulong_masksonly.sh"), "--gate_init", "0.5",
         "--include_num_input_tokens_seen", "true", "--ddp_timeout", str(DDP_TIMEOUT_S)], env)


def test_masks_only_script_with_sequence_parallelism_equals_one_process(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in documents()))
    run_script(tmp_path / "one", data, nproc=1, seq_parallel_size=1)
    run_script(tmp_path / "sp2", data, nproc=2, seq_parallel_size=2)
    ref_state = safetensors.torch.load_file(str(tmp_path / "one" / STATE_FILE))
    state = safetensors.torch.load_file(str(tmp_path / "sp2" / STATE_FILE))
    ref_log = read_csv(tmp_path / "one" / "train_log.csv")
    check_same_run(read_csv(tmp_path / "sp2" / "train_log.csv"), ref_log, state, ref_state)
    assert (ref_state["log_alpha"] - 0.5).abs().min() > 1e-2  # every gate moved
    # Each step takes one row of 199 tokens, counted once although 2 processes hold it.
    assert tokens_seen(tmp_path / "sp2", STEPS) == tokens_seen(tmp_path / "one", STEPS) == \
        [SEQ_LEN * s for s in range(1, STEPS + 1)]
    summary = json.loads((tmp_path / "sp2" / "summary.json").read_text())
    assert summary["global_step"] == STEPS and (tmp_path / "sp2" / "head_mask_sp0.5.tsv").is_file()

    # Interrupted after checkpoint-2 and run again: resumes there, skips the rows already seen.
    shutil.copytree(tmp_path / "sp2", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / f"checkpoint-{STEPS}")
    run_script(tmp_path / "resumed", data, nproc=2, seq_parallel_size=2)
    resumed = safetensors.torch.load_file(str(tmp_path / "resumed" / STATE_FILE))
    check_same_run(read_csv(tmp_path / "resumed" / "train_log.csv"), ref_log, resumed, ref_state)
    for key in state:
        torch.testing.assert_close(resumed[key], state[key], rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------------------------
# masks-and-weights through PruLongTrainer: 4 processes = 2 replicas x seq_parallel_size 2
# --------------------------------------------------------------------------------------------


def train_and_evaluate(output_dir: Path, seq_parallel_size: int, accumulation: int) -> dict:
    """Train 4 steps and evaluate on 3 rows (an odd count: one replica repeats a row, which is dropped)."""
    tokenizer = ByteTokenizer()
    rows = pack_documents([tokenize_record(r, tokenizer) for r in documents()], SEQ_LEN, tokenizer.pad_token_id)
    model = PruLongModel(tiny_random_llama(seed=0), mode="masks_and_weights", gate_init=0.5, sink=16, window=32,
                         block_size=16)
    args = PruLongTrainingArguments(
        output_dir=str(output_dir), mode="masks_and_weights", max_steps=STEPS, seq_parallel_size=seq_parallel_size,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, mask_learning_rate=0.2, reg_learning_rate=1.0,
        sparsity_warmup_ratio=0.5, save_strategy="no", use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
        include_num_input_tokens_seen=True, per_device_eval_batch_size=1, ddp_timeout=DDP_TIMEOUT_S)
    trainer = PruLongTrainer(model, args, train_dataset=PackedDataset(rows), eval_dataset=PackedDataset(rows[:3]))
    trainer.train()
    metrics = trainer.evaluate()
    return {"log": [entry for entry in trainer.state.log_history if "lm_loss" in entry],
            "eval_loss": metrics["eval_loss"], "state": trainer.prulong_model.state_dict()}


def worker(output_dir: Path) -> None:
    """One process of the torchrun launch (``python tests/test_sp_training.py OUT``)."""
    torch.set_num_threads(1)
    result = train_and_evaluate(output_dir, seq_parallel_size=2, accumulation=1)
    torch.save(result, output_dir / f"rank{os.environ['RANK']}.pt")


def test_data_parallel_times_sequence_parallel_trainer_equals_one_process(tmp_path):
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", __file__,
         str(tmp_path)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train_and_evaluate(tmp_path / "one", seq_parallel_size=1, accumulation=2)
    finally:
        torch.set_num_threads(threads)
    ref_log = [{key: str(entry[key]) for key in LOGGED} | {"step": str(entry["step"])} for entry in ref["log"]]
    assert any(name.startswith("model.") for name in ref["state"])  # the weights train in this mode
    for rank in range(4):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        log = [{key: str(entry[key]) for key in LOGGED} | {"step": str(entry["step"])} for entry in result["log"]]
        check_same_run(log, ref_log, result["state"], ref["state"])
        close(result["eval_loss"], ref["eval_loss"], "eval_loss")
        # 2 rows of 199 tokens per step: the replicas' rows, or the accumulated micro-batches.
        assert [entry["num_input_tokens_seen"] for entry in result["log"]] == \
            [entry["num_input_tokens_seen"] for entry in ref["log"]] == [2 * SEQ_LEN * s for s in range(1, STEPS + 1)]


# --------------------------------------------------------------------------------------------
# Start-up checks
# --------------------------------------------------------------------------------------------


def test_heads_that_do_not_split_are_refused_at_start_up(tmp_path):
    args = PruLongTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    args.seq_parallel_size = 3  # as if 3 processes were launched
    model = PruLongModel(tiny_random_llama(), mode="masks_only", sink=16, window=32, block_size=16)
    with pytest.raises(ValueError, match=r"seq_parallel_size \(3\) ranks, so seq_parallel_size must divide 4"):
        PruLongTrainer(model, args)


def test_the_script_refuses_a_degree_that_does_not_divide_the_processes(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "run_scripts" / "prulong_masksonly.sh")], cwd=ROOT, text=True,
                          env={**os.environ, "NPROC": "2", "SEQ_PARALLEL_SIZE": "3", "OUT": str(tmp_path),
                               "PYTHON": "false"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    assert done.returncode != 0 and "SEQ_PARALLEL_SIZE (3) must divide NPROC (2)" in done.stdout


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
