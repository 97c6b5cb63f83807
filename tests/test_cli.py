"""``sparseattn demo`` / ``generate`` (sparseattn.cli, sparseattn.demo) and the passkey prompt (sparseattn.tasks).

Everything runs on a tiny random-weight Llama (hidden 64, 2 layers, 4 / 2 heads) with a 320-token
byte-level BPE tokenizer trained here on one standard-library file, saved with ``save_pretrained``
so ``load_llama`` reads it like any model folder. Answers are noise; structure and plumbing are
what is tested. Nothing loads the real 98 MB model.
"""

import io
import json
import sys

import pytest
import torch
import transformers

from sparseattn import cli, demo
from sparseattn.demo import DEMO_METHODS, MethodResult, greedy_decode, parse_overrides, parse_value, run_demo
from sparseattn.integrations import transformers as integration
from sparseattn.tasks import ANSWER_PREFIX, LINE_REACH, build_passkey_prompt, is_correct
from tiny_models import NUM_LAYERS, make_tokenizer, save_tiny_llama

@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(vocab_size=320)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, max_positions=2048)


@pytest.fixture(scope="module")
def tiny(model_dir):
    from sparseattn.models import load_llama

    return load_llama(model_dir, device="cpu")


# --------------------------------------------------------------------------------------------
# The passkey prompt
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [300, 1000, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_length_and_needle_depth(tokenizer, length, depth):
    prompt = build_passkey_prompt(tokenizer, length, depth=depth, passkey="90210")
    assert len(prompt.input_ids) == length  # exact: assembled from token ids
    assert prompt.answer == "90210" and prompt.chat
    needle = tokenizer.decode(prompt.input_ids[prompt.needle_token_index:prompt.needle_token_index + 60])
    assert needle.lstrip("\n").startswith("The secret passkey is 90210.")
    # At the start of a line at most LINE_REACH tokens before the requested point.
    split, wanted = prompt.depth * prompt.haystack_tokens, depth * prompt.haystack_tokens
    assert wanted - LINE_REACH <= split <= wanted + 0.5
    after = tokenizer.decode(prompt.input_ids[prompt.needle_token_index:])
    if 0 < depth < 1 and split != round(wanted):  # moved back: to the end of a haystack line
        assert after.startswith("\nThe secret passkey is 90210.\n\n")
    assert prompt.text.count("90210") == 1
    assert prompt.text.startswith("<|im_start|>user\n") and prompt.text.endswith("assistant\n" + ANSWER_PREFIX)
    assert "What is the secret passkey" in prompt.text


def test_prompt_is_deterministic_and_without_chat_template():
    plain = make_tokenizer(chat=False, vocab_size=320)
    a = build_passkey_prompt(plain, 500, depth=0.3)
    b = build_passkey_prompt(plain, 500, depth=0.3)
    assert a == b and not a.chat and len(a.input_ids) == 500
    assert a.text.rstrip().endswith("Answer: " + ANSWER_PREFIX)
    assert "# File: textwrap.py" in a.text  # the first haystack file


@pytest.mark.parametrize("kwargs, match", [
    (dict(length=500, depth=1.5), "depth must be a number in"),
    (dict(length=500, depth=True), "depth must be a number in"),
    (dict(length=20), "length must be at least"),
    (dict(length="500"), "length must be an int"),
    (dict(length=500, passkey="12ab"), "passkey must be a string of digits"),
])
def test_prompt_rejects_bad_input(tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_passkey_prompt(tokenizer, **kwargs)


def test_prompt_chat_needs_a_template():
    with pytest.raises(ValueError, match="no chat template"):
        build_passkey_prompt(make_tokenizer(chat=False, vocab_size=320), 500, chat=True)


@pytest.mark.parametrize("answer, ok", [(" 71432.", True), ("71432", True), ("is 71432, yes", True),
                                        ("714321", False), ("7143", False), ("", False)])
def test_is_correct(answer, ok):
    assert is_correct(answer, "71432") is ok


# --------------------------------------------------------------------------------------------
# The demo's logic
# --------------------------------------------------------------------------------------------


def test_greedy_decode_matches_generate(tiny):
    model, _ = tiny
    ids = torch.randint(3, 300, (1, 100), generator=torch.Generator().manual_seed(0))
    tokens, prefill_s, decode_s = greedy_decode(model, ids, 5)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, 100:].tolist()
    assert tokens == expected[:len(tokens)] and prefill_s > 0 and decode_s >= 0
    # An eos token ends the answer and is not part of it.
    cut, _, _ = greedy_decode(model, ids, 5, eos_ids=[expected[2]])
    assert cut == expected[:expected.index(expected[2])]


def test_run_demo_rows(tiny):
    model, tokenizer = tiny
    lines = []
    result = run_demo(model, tokenizer, context=512, methods=DEMO_METHODS, max_new_tokens=3,
                      overrides={"xattention": {"threshold": 0.9}}, progress=lines.append)
    rows = result["rows"]
    assert [row["method"] for row in rows] == ["dense", *DEMO_METHODS]
    fields = {f for f in MethodResult.__dataclass_fields__}
    assert all(set(row) == fields for row in rows)
    dense, sparse = rows[0], rows[1:]
    assert dense["density"] == 1.0 and dense["speedup"] == 1.0 and dense["config"] == {}
    for row in sparse:
        assert row["sparse_calls"] == NUM_LAYERS, row["method"]  # every layer's prefill went sparse
        assert 0 < row["density"] <= 1 and row["prefill_s"] > 0
        assert row["speedup"] == pytest.approx(dense["prefill_s"] / row["prefill_s"])
        assert isinstance(row["answer"], str) and isinstance(row["correct"], bool)
    by_method = {row["method"]: row for row in rows}
    assert by_method["minference"]["options"] == {"adaptive_budget": 0.1}
    assert by_method["minference"]["config"]["adaptive_budget"] == 0.1
    assert by_method["xattention"]["config"]["threshold"] == 0.9
    assert by_method["xattention"]["options"] == {"threshold": 0.9}
    assert by_method["streaming"]["options"] == {}
    assert result["prompt"]["tokens"] == 512
    json.dumps(result)  # JSON-ready as it is
    table = cli._format_table(demo.TABLE_HEADERS, demo.table_rows(result))
    assert len(table.splitlines()) == 2 + len(rows)
    assert any("needle" in line for line in lines)
    assert not integration.settings_for(model)  # every patch was undone


def test_run_demo_warmup_keeps_the_timed_prefill(tiny):
    result = run_demo(*tiny, context=300, methods=["streaming"], max_new_tokens=2, warmup=1)
    assert result["warmup"] == 1 and result["rows"][1]["sparse_calls"] == NUM_LAYERS


def test_run_demo_rejects_unknown_method(tiny):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run_demo(*tiny, context=512, methods=["nope"])


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_cli_demo_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = cli.main(["demo", "--model", str(model_dir), "--context", "400", "--methods", "streaming,xattention",
                   "--max-new-tokens", "2", "--set", "xattention.threshold=0.8", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "| method" in printed and "| streaming" in printed and "speed needs a GPU" in printed
    result = json.loads(out.read_text())
    assert [row["method"] for row in result["rows"]] == ["dense", "streaming", "xattention"]
    assert result["rows"][2]["config"]["threshold"] == 0.8


@pytest.mark.parametrize("argv, match", [
    (["--methods", "xattention,nope"], "unknown method(s) ['nope']"),
    (["--context", "100"], "--context must be at least 256"),
    (["--depth", "2"], "--depth must be in [0, 1]"),
    (["--set", "threshold=0.9"], "METHOD.KEY=VALUE"),
    (["--set", "minference.vertical_size=0"], "vertical_size must be > 0"),
    (["--model", "/no/such/model"], "does not exist"),
])
def test_cli_demo_rejects_bad_input(argv, match, capsys):
    assert cli.main(["demo", "--device", "cpu", *argv]) == 2
    assert match in capsys.readouterr().err


def test_cli_demo_context_must_fit_the_model(model_dir, capsys):
    # The tiny model has 2048 positions: the prompt and the answer must both fit.
    argv = ["demo", "--device", "cpu", "--model", str(model_dir), "--max-new-tokens", "12"]
    assert cli.main([*argv, "--context", "2040"]) == 2
    assert "--context 2040 + --max-new-tokens 12 do not fit the model's 2048 positions" in capsys.readouterr().err


class _Stdin(io.StringIO):
    def __init__(self, text="", tty=False):
        super().__init__(text)
        self._tty = tty

    def isatty(self):
        return self._tty


@pytest.fixture
def patch_calls(monkeypatch):
    """Record the keyword arguments of every ``patch()`` call."""
    calls = []
    original = integration.patch

    def recording_patch(model, **kwargs):
        calls.append(kwargs)
        return original(model, **kwargs)

    monkeypatch.setattr(integration, "patch", recording_patch)
    return calls


def test_cli_generate_from_stdin(model_dir, monkeypatch, capsys, patch_calls):
    monkeypatch.setattr(sys, "stdin", _Stdin("def fibonacci(n):\n    " * 20))
    rc = cli.main(["generate", "--model", str(model_dir), "--method", "streaming", "--set", "sink=16",
                   "--set", "window=32", "--set", "block_size=16", "--min-sparse-len", "0", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 0
    assert patch_calls == [dict(method="streaming", min_sparse_len=0, sink=16, window=32, block_size=16)]
    assert f"{NUM_LAYERS} sparse" in captured.err and "4 new tokens" in captured.err
    assert captured.out.strip() and "Loading" not in captured.out  # stdout: the streamed answer alone


def test_cli_generate_from_file_with_chat(model_dir, tmp_path, capsys, patch_calls):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What is a heap?")
    rc = cli.main(["generate", "--model", str(model_dir), "--prompt-file", str(prompt), "--chat",
                   "--max-new-tokens", "3", "--set", "threshold=0.9", "--set", "stride=8"])
    captured = capsys.readouterr()
    assert rc == 0
    assert patch_calls[0]["threshold"] == 0.9 and patch_calls[0]["stride"] == 8
    assert patch_calls[0]["min_sparse_len"] == integration.CROSSOVER_LENGTHS["xattention"]
    assert f"{NUM_LAYERS} short" in captured.err  # a short prompt stays dense below the crossover


def test_cli_generate_dense(model_dir, monkeypatch, capsys, patch_calls):
    monkeypatch.setattr(sys, "stdin", _Stdin("hello"))
    assert cli.main(["generate", "--model", str(model_dir), "--method", "dense", "--max-new-tokens", "2"]) == 0
    assert patch_calls == [] and "attention calls: dense" in capsys.readouterr().err


@pytest.mark.parametrize("argv, stdin, match", [
    (["--method", "nope"], "hi", "unknown --method 'nope'; choose from ['flexprefill', 'full', 'headmask', 'minference'"),
    (["--set", "threshold"], "hi", "--set takes key=value"),
    (["--set", "=3"], "hi", "--set takes key=value"),
    (["--set", "thresh=0.9"], "hi", "unknown XAttentionConfig option(s) ['thresh']"),
    (["--set", "threshold=2"], "hi", "threshold"),
    (["--set", "stride=abc"], "hi", "XAttentionConfig.stride must be of type int"),
    (["--method", "dense", "--set", "threshold=0.9"], "hi", "needs a sparse --method"),
    ([], "  \n", "the prompt is empty"),
    ([], None, "no prompt: pass --prompt-file PATH or pipe"),
    (["--prompt-file", "/no/such/file"], "hi", "cannot read --prompt-file /no/such/file"),
    (["--min-sparse-len", "-1"], "hi", "--min-sparse-len must be >= 0"),
    (["--device", "gpu0"], "hi", "--device 'gpu0' is not a device"),
])
def test_cli_generate_rejects_bad_input(argv, stdin, match, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", _Stdin(stdin or "", tty=stdin is None))
    assert cli.main(["generate", "--model", "/never/loaded", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparseattn generate: error:") and match in err


def test_cli_generate_chat_needs_a_template(tmp_path, model_dir, monkeypatch, capsys):
    folder = tmp_path / "no-template"
    transformers.AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(folder)
    make_tokenizer(chat=False, vocab_size=320).save_pretrained(folder)
    monkeypatch.setattr(sys, "stdin", _Stdin("hi"))
    assert cli.main(["generate", "--model", str(folder), "--chat"]) == 2
    assert "--chat needs a tokenizer with a chat template" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [("8", 8), ("-2", -2), ("0.9", 0.9), ("1e-3", 1e-3), ("true", True),
                                         ("False", False), ("none", None), ("vertical_and_slash",
                                                                            "vertical_and_slash")])
def test_parse_value(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_parse_overrides():
    assert parse_overrides(["threshold=0.9", " stride = 8 ", "pattern=a_shape"]) == \
        {"threshold": 0.9, "stride": 8, "pattern": "a_shape"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["threshold:0.9"])


@pytest.mark.parametrize("name", ["sparseattn.demo", "sparseattn.tasks"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
