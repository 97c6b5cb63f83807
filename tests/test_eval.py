"""sparseattn.evaluation and the ``eval`` / ``fidelity`` / ``viz`` / ``memory`` commands.

Models: a tiny random-weight Llama (hidden 64, 2 layers, 4 / 2 heads) with a 400-token byte-level
BPE tokenizer trained here on one standard-library file (answers are noise: plumbing, scoring,
resuming and the measurements' arithmetic are what is tested), and the embedded SmolLM2
(fetched once, like `sparseattn demo`) for fidelity on real activations.
"""

import collections
import json
import re

import pytest
import torch
import transformers

from sparseattn import cli
from sparseattn.api import attend, resolve_config
from sparseattn.evaluation import external, fidelity, memory, perplexity, report, ruler, runner, scoring, viz
from sparseattn.evaluation.haystack import REPEAT_SENTENCES
from sparseattn.methods import get_method
from sparseattn.reference.attention import reference_attention
from tiny_models import NUM_LAYERS, make_tokenizer, save_tiny_llama

NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey", "vt")
# Methods small enough to sparsify a few hundred tokens.
SMALL = {"streaming": {"sink": 16, "window": 64, "block_size": 16},
         "xattention": {"block_size": 16, "stride": 8, "threshold": 0.9}}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(vocab_size=400)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, max_positions=4096)


@pytest.fixture(scope="module")
def tiny(model_dir):
    from sparseattn.models import load_llama

    return load_llama(model_dir, device="cpu")


# --------------------------------------------------------------------------------------------
# Task generators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [700, 1500])
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_task_is_deterministic_fits_and_holds_its_answers(tokenizer, task, length):
    a = ruler.generate(task, tokenizer, length, seed=3)
    assert a == ruler.generate(task, tokenizer, length, seed=3)
    assert a.input_ids != ruler.generate(task, tokenizer, length, seed=4).input_ids
    if task in NEEDLE_TASKS:
        assert len(a.input_ids) == length
    else:  # the longest list that fits: at most one item (a UUID pair, a numbered word, a coded word) short
        assert length - 80 <= len(a.input_ids) <= length
    text = tokenizer.decode(a.input_ids)
    assert text.startswith("<|im_start|>user\n") and a.metadata["chat"]
    assert a.answers and all(answer in text for answer in a.answers)
    assert a.metric in scoring.METRICS and a.max_new_tokens >= 8
    context = text[:text.index("<|im_start|>assistant")]
    if task.startswith("niah"):
        for key, value in a.metadata["needles"]:
            assert context.count(f"One of the special magic numbers for {key} is: {value}.") == 1
        asked = a.metadata["asked"]
        assert a.answers == [v for k in asked for k2, v in a.metadata["needles"] if k2 == k] or \
            sorted(a.answers) == sorted(v for k2, v in a.metadata["needles"] if k2 in asked)
    elif task == "vt":
        chain = a.metadata["chain"]
        positions = [context.index(line) for line in chain]
        assert positions == sorted(positions)  # in assignment order
        assert len(set(a.answers)) == 5 and chain[0].endswith(a.metadata["value"])
    elif task == "cwe":
        words = re.findall(r"^\d+\. (\w+)$", context, flags=re.M)
        counts = collections.Counter(words)
        assert all(counts[w] == a.metadata["freq_common"] for w in a.answers)
        assert max(c for w, c in counts.items() if w not in a.answers) < a.metadata["freq_common"]
    elif task == "fwe":
        coded = context.split("\n\n")[-2].split()
        top = collections.Counter(coded).most_common(3)
        assert [w for w, _ in top] == a.answers
    elif task == "kv_retrieval":
        obj = json.loads(context[context.index("{"):context.rindex("}") + 1])
        assert obj[a.metadata["key"]] == a.answers[0] and len(obj) == a.metadata["pairs"]


def test_needles_sit_at_their_positions_on_lines_of_their_own(tokenizer):
    p = ruler.generate("niah_multikey", tokenizer, 2000, seed=1)
    for index, (key, _) in zip(p.metadata["needle_token_index"], p.metadata["needles"]):
        assert tokenizer.decode(p.input_ids[index:index + 40]).startswith(f"\nOne of the special magic numbers for {key}")
    assert p.metadata["depth"] == sorted(p.metadata["depth"]) and 0 <= p.metadata["depth"][0] <= 1


def test_plain_prompt_and_haystack_sources(tmp_path):
    plain = make_tokenizer(chat=False)
    p = ruler.generate("passkey", plain, 600, seed=0, haystack="repeat")
    text = plain.decode(p.input_ids)
    assert len(p.input_ids) == 600 and not p.metadata["chat"] and p.metadata["haystack"] == "repeat"
    assert REPEAT_SENTENCES in text and text.rstrip().endswith("Answer: The pass key is")
    (tmp_path / "notes.txt").write_text("Zebras graze quietly near the river bank.\n" * 400)
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    q = ruler.generate("niah_single", plain, 600, seed=0, haystack=str(tmp_path))
    assert "Zebras graze" in plain.decode(q.input_ids) and q.metadata["haystack"] == f"folder:{tmp_path.resolve()}"
    (tmp_path / "notes.txt").write_text("Too short.")
    small = tmp_path.parent / "small-haystack"
    small.mkdir()
    (small / "a.md").write_text("Only a few words.")
    with pytest.raises(ValueError, match="has only .* tokens"):
        ruler.generate("niah_single", plain, 3000, seed=0, haystack=str(small))


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="nope", length=500), "unknown task 'nope'"),
    (dict(task="passkey", length=40), "length must be at least"),
    (dict(task="cwe", length=40), "too short for the template"),
    (dict(task="passkey", length=True), "length must be a positive int"),
])
def test_generate_rejects_bad_input(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ruler.generate(kwargs.pop("task"), tokenizer, kwargs.pop("length"), **kwargs)


def test_chat_needs_a_template():
    with pytest.raises(ValueError, match="no chat template"):
        ruler.generate("passkey", make_tokenizer(chat=False), 500, chat=True)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction, answers, metric, expected", [
    (" 1234567.", ["1234567"], "all", 1.0),
    ("1234567 and 2", ["1234567", "7654321"], "all", 0.5),
    ("ABCDE, fghij", ["abcde", "FGHIJ", "zzzzz", "yyyyy"], "all", 0.5),
    ("nothing", ["1234567"], "all", 0.0),
    ("\x00 Paris\x1f", ["paris", "Lyon"], "part", 1.0),
    ("Marseille", ["paris", "Lyon"], "part", 0.0),
    ("The cat sat down.", ["a cat sat"], "f1", 0.8),
    ("dog", ["a cat sat", "dog"], "f1", 1.0),
    ("", ["x"], "f1", 0.0),
])
def test_score(prediction, answers, metric, expected):
    assert scoring.score(prediction, answers, metric) == pytest.approx(expected)


def test_score_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown metric"):
        scoring.score("a", ["a"], "bleu")
    with pytest.raises(ValueError, match="answers must not be empty"):
        scoring.score("a", [], "all")


# --------------------------------------------------------------------------------------------
# LongBench / InfiniteBench files
# --------------------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    long_context = "Ada Lovelace wrote the first program. " + "Filler words fill the page. " * 300 + "The end."
    lb = [{"input": "Who wrote the first program?", "context": long_context, "answers": ["Ada Lovelace"],
           "length": 900, "dataset": "narrativeqa", "language": "en", "all_classes": None, "_id": str(i)}
          for i in range(3)]
    (folder / "narrativeqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lb))
    ib = [{"id": 0, "context": "noise " * 50 + "The pass key is 4711. " + "noise " * 50,
           "input": "What is the pass key?", "answer": ["4711"], "options": []}]
    (folder / "passkey.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ib))
    return folder


def test_external_files_are_found_loaded_and_cut_in_the_middle(data_dir, tokenizer):
    files = external.find_data_files(data_dir)
    assert [(f.name, f.suite) for f in files] == [("longbench/narrativeqa", "longbench"),
                                                  ("infinitebench/passkey", "infinitebench")]
    examples = external.load_examples(files[0], limit=2)
    assert len(examples) == 2 and examples[0]["answers"] == ["Ada Lovelace"]
    prompt = external.build_prompt(tokenizer, files[0], examples[0], 400, index=0)
    assert len(prompt.input_ids) == 400 and prompt.metadata["truncated"] and prompt.metric == "f1"
    text = tokenizer.decode(prompt.input_ids)
    assert "Ada Lovelace wrote" in text and "The end." in text and "Who wrote the first program?" in text
    short = external.build_prompt(tokenizer, files[1], external.load_examples(files[1], 5)[0], 2000)
    assert short.metric == "part" and not short.metadata["truncated"] and len(short.input_ids) < 2000
    (data_dir / "bad.jsonl").write_text('{"question": "?"}\n')
    with pytest.raises(ValueError, match="no 'context' and 'input'"):
        external.find_data_files(data_dir)


# --------------------------------------------------------------------------------------------
# The runner: same prompts for every method, densities, resuming
# --------------------------------------------------------------------------------------------


RUN = dict(tasks=["passkey", "kv_retrieval"], lengths=[400], samples=2, methods=SMALL, ppl_lengths=[300],
           max_new_tokens=3, progress=False)
TIMING = ("prefill_s", "decode_s")


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-full")
    return out, runner.run_eval(*tiny, out, **RUN)


def test_run_eval_rows(full_run):
    out, rows = full_run
    tasks = [r for r in rows if r["kind"] == "task"]
    assert len(tasks) == 2 * 2 * 3 and len([r for r in rows if r["kind"] == "ppl"]) == 3
    for r in tasks:
        assert 0 <= r["score"] <= 1 and r["prefill_s"] > 0 and r["new_tokens"] <= 3
        if r["method"] == "dense":
            assert r["density"] == 1.0 and r["settings"]["options"] == {"attn_implementation": "sdpa"}
        else:  # every layer's prefill ran sparse
            assert r["sparse_calls"] == NUM_LAYERS and r["dense_calls"] == 0 and 0 < r["density"] <= 1
            assert r["settings"]["options"] == SMALL[r["method"]]
    # The same prompt for every method of an item.
    by_item = collections.defaultdict(set)
    for r in tasks:
        by_item[(r["task"], r["sample"])].add((r["prompt_tokens"], tuple(r["answers"])))
    assert all(len(v) == 1 for v in by_item.values()) and len(by_item) == 4
    streaming = [r for r in tasks if r["method"] == "streaming"]
    assert all(r["density"] < 0.8 for r in streaming)  # 400 tokens, window 64: clearly sparse
    ppl = {r["method"]: r for r in rows if r["kind"] == "ppl"}
    assert ppl["dense"]["tokens"] == 299 and ppl["streaming"]["ppl"] != ppl["dense"]["ppl"]
    assert len((out / runner.RESULTS_FILE).read_text().splitlines()) == len(rows)


def test_run_eval_resumes_without_recomputing(full_run, tiny, tmp_path, monkeypatch):
    _, reference_rows = full_run
    calls = []
    original = runner.greedy_decode

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_after:
            raise KeyboardInterrupt  # a kill in the middle of the run
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "greedy_decode", counting)
    stop_after = 5
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(*tiny, tmp_path, **RUN)
    done = len(runner.load_rows(tmp_path / runner.RESULTS_FILE))
    assert done == 4
    with open(tmp_path / runner.RESULTS_FILE, "a") as f:
        f.write('{"kind": "task", "ta')  # a line cut short by the kill
    calls.clear()
    stop_after = None
    rows = runner.run_eval(*tiny, tmp_path, **RUN)
    assert len(calls) == 12 - done  # only the missing answers were computed
    assert _strip(rows) == _strip(reference_rows)
    assert _strip(runner.load_rows(tmp_path / runner.RESULTS_FILE)) == _strip(reference_rows)
    calls.clear()
    runner.run_eval(*tiny, tmp_path, **RUN)
    assert calls == []  # all done: nothing recomputed


def test_run_eval_refuses_mixed_settings(full_run, tiny):
    out, _ = full_run
    with pytest.raises(ValueError, match="with other settings"):
        runner.run_eval(*tiny, out, **dict(RUN, methods={"streaming": {"sink": 16, "window": 32, "block_size": 16}}))


def test_method_options():
    assert runner.method_options(["xattention.threshold=0.9", "streaming.window=64"], ["xattention", "streaming"]) == \
        {"xattention": {"threshold": 0.9}, "streaming": {"window": 64}}
    for items, names, match in [(["threshold=0.9"], ["xattention"], "METHOD.KEY=VALUE"),
                                (["streaming.window=0"], ["streaming"], "streaming: window"),
                                ([], ["nope"], "unknown method 'nope'"), ([], ["dense"], "always evaluated")]:
        with pytest.raises(ValueError, match=match):
            runner.method_options(items, names)


def test_eval_with_a_per_layer_data_file(tiny, tmp_path):
    """``--set xattention.layer_configs=FILE`` reaches patch(): per-head thresholds from the file."""
    doc = {"format": "sparseattn.xattention_thresholds", "version": 1, "model": "tiny", "num_layers": NUM_LAYERS,
           "num_heads": 4, "stride": 8, "block_size": 16, "target_coverage": 0.9, "statistic": "mean",
           "thresholds": [[0.3, 0.5, 0.7, 0.9]] * NUM_LAYERS}
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(doc))
    options = runner.method_options([f"xattention.layer_configs={path}"], ["xattention"])
    assert options == {"xattention": {"layer_configs": str(path)}}
    rows = runner.run_eval(*tiny, tmp_path / "out", tasks=["passkey"], lengths=[300], samples=1, methods=options,
                           ppl_lengths=[], progress=False)
    sparse = [r for r in rows if r["method"] == "xattention"]
    assert len(sparse) == 1 and sparse[0]["sparse_calls"] == NUM_LAYERS and sparse[0]["density"] < 1
    assert sparse[0]["settings"]["options"] == {"layer_configs": str(path)}
    with pytest.raises(ValueError, match="use method='xattention'"):
        runner.run_eval(*tiny, tmp_path / "bad", tasks=["passkey"], lengths=[300], samples=1, ppl_lengths=[],
                        methods={"minference": {"layer_configs": str(path)}}, progress=False)


def test_summary_arithmetic():
    def row(method, task, length, score, density=1.0):
        return {"kind": "task", "method": method, "task": task, "length": length, "sample": 0, "score": score,
                "density": density, "density_all": density, "prefill_s": 1.0, "settings": {"options": {}}}

    rows = [row("dense", "a", 1024, 1.0), row("dense", "b", 1024, 0.5), row("dense", "a", 2048, 1.0),
            row("x", "a", 1024, 1.0, 0.5), row("x", "b", 1024, 0.0, 0.3), row("x", "a", 2048, 0.5, 0.4)]
    summary = report.summarize(rows)
    x = summary["methods"]["x"]
    assert x["accuracy"] == pytest.approx(0.5) and x["vs_dense"] == pytest.approx(0.5 / (2.5 / 3))
    assert x["by_length"] == {1024: pytest.approx(0.5), 2048: pytest.approx(0.5)}
    assert x["density"] == pytest.approx(0.4)
    assert summary["methods"]["dense"]["vs_dense"] == pytest.approx(1.0)


def test_reports(full_run, tmp_path):
    _, rows = full_run
    paths = report.write_reports(rows, tmp_path, {"model": "tiny", "device": "cpu"})
    assert [p.name for p in paths] == ["results.json", "results.csv", "results.md", "accuracy.png"]
    saved = json.loads(paths[0].read_text())
    assert saved["meta"]["model"] == "tiny" and len(saved["rows"]) == len(rows)
    assert set(saved["summary"]["methods"]) == {"dense", "streaming", "xattention"}
    assert len(paths[1].read_text().splitlines()) == len(rows) + 1
    md = paths[2].read_text()
    assert "| dense |" in md and "| passkey |" in md and "Perplexity" in md
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_token_nll_matches_the_model_loss(arch):
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300))
    else:  # soft-capped logits
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            head_dim=16, vocab_size=300, final_logit_softcapping=3.0, sliding_window=64))
    model.eval()
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(1))
    nll = perplexity.token_nll(model, ids, chunk=37)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert nll.shape == (199,) and torch.allclose(nll.mean(), loss, atol=1e-5)
    result = perplexity.perplexity(model, ids, chunk=50)
    assert result["ppl"] == pytest.approx(float(loss.exp()), rel=1e-4) and result["tokens"] == 199


# --------------------------------------------------------------------------------------------
# Fidelity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, options", [
    ("minference", dict(vertical_size=40, slash_size=80, block_size=32)),
    ("xattention", dict(block_size=32, stride=8, threshold=0.6)),
    ("streaming", dict(sink=16, window=64, block_size=16)),
])
def test_fidelity_matches_brute_force(method, options):
    """Recall and error computed chunk by chunk equal the full-matrix computation and the real sparse path."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 333, 32, generator=g) for h in (4, 2, 2))
    index = get_method(method).select(q, k, resolve_config(method, **options))
    fid = fidelity.attention_fidelity(q, k, v, index)
    causal = torch.ones(333, 333, dtype=torch.bool).tril()
    kk = k.repeat_interleave(2, dim=1)
    probs = ((q @ kk.transpose(-1, -2)) / 32 ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
    recall = (probs * index.to_element_mask(True)).sum(-1).mean(-1)
    dense, sparse = reference_attention(q, k, v), attend(q, k, v, index)
    error = (sparse - dense).norm(dim=(-1, -2)) / dense.norm(dim=(-1, -2))
    assert torch.allclose(fid["recall"], recall, atol=1e-5) and torch.allclose(fid["rel_error"], error, atol=1e-4)
    assert (fid["recall"] < 1).all() and (fid["rel_error"] > 0).all()


def test_run_fidelity_full_is_exact_and_sparse_is_not(tiny, tmp_path):
    result = fidelity.run_fidelity(*tiny, length=300, methods={"full": {}, "streaming": SMALL["streaming"]})
    assert result["layers"] == [0, 1] and result["num_heads"] == 4
    full, streaming = result["methods"]["full"], result["methods"]["streaming"]
    assert all(abs(r - 1) < 1e-6 for row in full["recall"] for r in row)
    assert all(e < 1e-6 for row in full["rel_error"] for e in row)
    assert all(r < 1 for row in streaming["recall"] for r in row)
    assert all(0 < d < 1 for row in streaming["density"] for d in row)
    assert "| streaming |" in fidelity.fidelity_table(result)
    paths = fidelity.fidelity_heatmaps(result, tmp_path)
    assert [p.name for p in paths] == ["fidelity-full.png", "fidelity-streaming.png"]


def test_fidelity_on_real_activations(embedded_model_path):
    """SmolLM2 on standard-library text: dense is exact, a sparse selection misses some attention mass."""
    from sparseattn.models import load_llama

    model, tokenizer = load_llama(str(embedded_model_path), device="cpu")
    result = fidelity.run_fidelity(model, tokenizer, length=320, layers=[2, 29],
                                   methods={"full": {}, "streaming": {"sink": 64, "window": 64, "block_size": 64}})
    full, streaming = result["methods"]["full"], result["methods"]["streaming"]
    assert all(abs(r - 1) < 1e-6 for row in full["recall"] for r in row) and max(map(max, full["rel_error"])) < 1e-6
    recalls = [r for row in streaming["recall"] for r in row]
    assert len(recalls) == 2 * 9 and max(recalls) < 1 and min(recalls) > 0.3


# --------------------------------------------------------------------------------------------
# viz and memory
# --------------------------------------------------------------------------------------------


def test_viz_writes_a_png(tiny, tmp_path):
    result = viz.run_viz(*tiny, method="streaming", options=SMALL["streaming"], layer=1, head=3, length=300,
                         path=tmp_path / "mask.png")
    assert (tmp_path / "mask.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < result["density"] < 1 and 0 < result["recall"] < 1 and result["block_q"] == 16
    with pytest.raises(ValueError, match="--head must be in"):
        viz.run_viz(*tiny, method="streaming", options={}, layer=0, head=4, length=300, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="selects no blocks"):
        viz.run_viz(*tiny, method="full", options={}, layer=0, head=0, length=300, path=tmp_path / "x.png")


def test_selection_picture_of_a_block_index():
    q = k = torch.randn(1, 2, 100, 16)
    index = get_method("streaming").select(q, k, resolve_config("streaming", sink=16, window=16, block_size=16))
    picture = viz.selection_picture(index, head=1)
    assert picture.shape == (7, 7)
    assert torch.isnan(picture[0, 1:]).all() and picture[6, 0] == 1 and picture[6, 6] == 1 and picture[6, 3] == 0


@pytest.mark.skipif(memory.measurement_kind(torch.device("cpu"))[0] is None, reason="no peak-memory counter here")
def test_traced_peak_is_exact():
    def pattern():
        a = torch.ones(1 << 20, dtype=torch.uint8)
        b = torch.ones(2 << 20, dtype=torch.uint8)
        del a
        c = torch.ones(3 << 20, dtype=torch.uint8)
        del b, c

    assert memory._traced_peak(pattern) == 5 << 20


@pytest.mark.skipif(memory.measurement_kind(torch.device("cpu"))[0] is None, reason="no peak-memory counter here")
def test_memory_on_cpu(tiny):
    result = memory.run_memory(*tiny, lengths=[1024], methods={"streaming": SMALL["streaming"]})
    rows = {r["implementation"]: r for r in result["rows"]}
    assert set(rows) == {"eager", "sdpa", "streaming"} and result["measure"] == "torch_profiler_cpu"
    # Eager holds [1, 4, 1024, 1024] fp32 scores and probabilities at once (16 MiB each); SDPA does not.
    assert rows["eager"]["peak_bytes"] > 32 * 2**20 and rows["sdpa"]["peak_bytes"] < 8 * 2**20
    assert rows["eager"]["reduction_vs"]["eager"] == 0 and rows["sdpa"]["reduction_vs"]["eager"] > 0.5
    assert 0 < rows["streaming"]["density"] < 1
    assert "| 1024 | eager |" in memory.memory_table(result)


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------


def test_cli_eval(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(model_dir), "--device", "cpu", "--tasks", "niah_single", "--lengths", "300",
            "--samples", "1", "--methods", "streaming", "--set", "streaming.window=64", "--set",
            "streaming.block_size=16", "--max-new-tokens", "2", "--ppl-lengths", "none", "--data-dir", str(data_dir),
            "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| streaming |" in printed and "| longbench/narrativeqa |" in printed
    assert {p.name for p in out.iterdir()} == {"results.jsonl", "meta.json", "results.json", "results.csv",
                                                "results.md", "accuracy.png"}
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted({(r["task"], r["method"]) for r in rows}) == [
        (t, m) for t in ("infinitebench/passkey", "longbench/narrativeqa", "niah_single") for m in ("dense", "streaming")]
    assert cli.main(argv) == 0  # resumed: everything was done
    (out / "results.md").unlink()
    assert cli.main(["eval", "--report-only", "--out", str(out)]) == 0
    assert "Device cpu, float32" in (out / "results.md").read_text()


@pytest.mark.parametrize("argv, match", [
    (["--tasks", "nope"], "unknown task(s) ['nope']"),
    (["--lengths", "1k"], "--lengths takes comma-separated integers"),
    (["--set", "streaming.windw=3"], "unknown StreamingConfig option(s) ['windw']"),
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--haystack", "/no/such/folder"], "--haystack must be stdlib, repeat or a folder"),
    (["--data-dir", "/no/such/folder"], "is not a folder"),
    (["--samples", "0"], "--samples and --max-new-tokens must be >= 1"),
])
def test_cli_eval_rejects_bad_input(argv, match, capsys):
    assert cli.main(["eval", "--model", "/never/loaded", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseattn eval: error:") and match in err


def test_cli_eval_length_must_fit_the_model(model_dir, capsys):
    assert cli.main(["eval", "--model", str(model_dir), "--device", "cpu", "--lengths", "4000"]) == 2
    assert "longer than the model's context (4096 tokens)" in capsys.readouterr().err


def test_cli_fidelity_viz_memory(model_dir, tmp_path, capsys):
    out = tmp_path / "fid"
    assert cli.main(["fidelity", "--model", str(model_dir), "--device", "cpu", "--length", "256", "--methods",
                     "streaming,minference", "--set", "streaming.window=64", "--set", "streaming.block_size=16",
                     "--set", "minference.adaptive_budget=0.2", "--layers", "1", "--out", str(out)]) == 0
    assert "| minference |" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"fidelity.json", "fidelity.md", "fidelity-streaming.png",
                                                "fidelity-minference.png"}
    assert json.loads((out / "fidelity.json").read_text())["layers"] == [1]
    png = tmp_path / "viz.png"
    assert cli.main(["viz", "--model", str(model_dir), "--device", "cpu", "--method", "xattention", "--set",
                     "block_size=16", "--set", "stride=8", "--layer", "1", "--head", "2", "--length", "256",
                     "--out", str(png)]) == 0
    assert "density" in capsys.readouterr().out and png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["viz", "--model", str(model_dir), "--method", "xattention", "--set", "strid=8"]) == 2
    assert "unknown XAttentionConfig option(s) ['strid']" in capsys.readouterr().err
    mem = tmp_path / "mem"
    rc = cli.main(["memory", "--model", str(model_dir), "--device", "cpu", "--lengths", "512", "--methods",
                   "streaming", "--set", "streaming.window=64", "--out", str(mem)])
    printed = capsys.readouterr().out
    assert rc == (0 if memory.measurement_kind(torch.device("cpu"))[0] else 2)
    assert "| 512 | streaming |" in printed and (mem / "memory.json").is_file()


@pytest.mark.parametrize("name", ["sparseattn.evaluation.haystack", "sparseattn.evaluation.scoring",
                                  "sparseattn.evaluation.external", "sparseattn.evaluation.perplexity",
                                  "sparseattn.evaluation.fidelity", "sparseattn.evaluation.viz"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
