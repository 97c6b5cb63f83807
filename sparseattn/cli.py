"""The ``sparseattn`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch


def _format_table(headers, rows) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit status 2."""


def _setup_logging() -> None:
    """Show the library's progress and warnings (``logging``, logger ``sparseattn``) on stderr."""
    logger = logging.getLogger("sparseattn")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _device(name: str | None) -> torch.device:
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N): {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is available")
    return device


def _load_model(model: str, device: torch.device, out=None):
    """``load_llama(model)`` with progress lines on ``out`` (default stdout)."""
    from .models import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAMES, load_llama

    out = out or sys.stdout
    if model.lower() in DEFAULT_MODEL_NAMES:
        print(f"Loading the default model, {DEFAULT_MODEL_FILE}, on {device} (downloaded from PyPI on first use, "
              "93 MB; loading takes ~25 s on a CPU) ...", file=out, flush=True)
    else:
        print(f"Loading {model} on {device} ...", file=out, flush=True)
    start = time.perf_counter()
    try:
        loaded = load_llama(model, device=device)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise UsageError(f"cannot load model {model!r}: {err}") from err
    print(f"Loaded in {time.perf_counter() - start:.1f} s.", file=out, flush=True)
    return loaded


def _method_options(items, known_methods) -> dict[str, dict]:
    """``--set METHOD.KEY=VALUE`` items of the demo -> ``{method: {key: value}}``."""
    from .demo import parse_overrides

    options: dict[str, dict] = {}
    for item in items:
        target, sep, rest = item.partition(".")
        if not sep or target not in known_methods:
            raise UsageError(f"demo --set takes METHOD.KEY=VALUE with METHOD one of {sorted(known_methods)}, "
                             f"got {item!r}")
        try:
            options.setdefault(target, {}).update(parse_overrides([rest]))
        except ValueError as err:
            raise UsageError(str(err).replace("--set takes key=value", "--set takes METHOD.KEY=VALUE")) from err
    return options


def cmd_demo(args) -> int:
    """A real model answers a long passkey prompt with dense attention and with every sparse method."""
    import json

    from .demo import MAX_DEMO_CONTEXT, TABLE_HEADERS, demo_settings, describe_methods, run_demo, table_rows
    from .methods import METHODS

    wall = time.perf_counter()
    device = _device(args.device)
    # The default fits the default model's 8192 positions; a longer --context is checked against the model.
    context = args.context or (MAX_DEMO_CONTEXT - 256 if device.type == "cuda" else 2048)
    if context < 256:
        raise UsageError(f"--context must be at least 256 tokens, got {context}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS or m == "full"]
    if unknown or not methods:
        raise UsageError(f"--methods: unknown method(s) {unknown}; choose from "
                         f"{sorted(m for m in METHODS if m != 'full')}")
    if not 0.0 <= args.depth <= 1.0:
        raise UsageError(f"--depth must be in [0, 1], got {args.depth}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    overrides = _method_options(args.set, methods)
    for method in methods:  # bad options fail here, before the model loads
        try:
            demo_settings(method, overrides.get(method))
        except (TypeError, ValueError) as err:
            raise UsageError(f"{method}: {err}") from err

    model, tokenizer = _load_model(args.model, device)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and context + args.max_new_tokens > limit:
        raise UsageError(f"--context {context} + --max-new-tokens {args.max_new_tokens} do not fit the model's "
                         f"{limit} positions")
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    path = "Triton kernels" if device.type == "cuda" else "exact fp32 reference path (CPU)"
    print(f"\nDense: the model's own SDPA. Sparse: sparseattn.patch(model, method=..., min_sparse_len=0), so every "
          f"layer's prefill is sparse ({path}) and decoding is dense. {dtype}, greedy, up to {args.max_new_tokens} "
          f"new tokens. Methods:")
    for line in describe_methods(methods, overrides):
        print(line)
    if device.type == "cpu" and context > 2048:
        print(f"Note: the CPU's reference path grows with the square of the length; at {context} tokens each sparse "
              f"method takes about {round(15 * (context / 2048) ** 2)} s or more.")
    print()
    result = run_demo(model, tokenizer, context=context, methods=methods, depth=args.depth,
                      max_new_tokens=args.max_new_tokens, overrides=overrides,
                      progress=lambda msg: print(msg, flush=True))
    result["model"] = args.model
    print()
    print(_format_table(TABLE_HEADERS, table_rows(result)))
    print("\ndensity: mean fraction of the causal attention computed, over the sparse prefill calls; "
          "prefill: one forward over the prompt, decoding excluded.")
    if device.type == "cuda":
        print("Speedups are of the whole model's prefill (MLPs and selection included), not of attention alone; "
              "`sparseattn bench kernel` measures the kernels.")
    else:
        print("On a CPU the sparse paths run the exact fp32 reference (selection, then masked attention), which is "
              "slower than dense SDPA: the answers and densities are real, the speed needs a GPU.")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    print(f"Total time {time.perf_counter() - wall:.0f} s.")
    return 0


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            return sys.stdin.read()
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read --prompt-file {args.prompt_file}: {err}") from err
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("no prompt: pass --prompt-file PATH or pipe the prompt into stdin")
    return sys.stdin.read()


def cmd_generate(args) -> int:
    """Generate from a prompt (a file or stdin) with any model and any method; the output streams to stdout."""
    from .api import resolve_config
    from .demo import parse_overrides, run_generate
    from .integrations.transformers import default_min_sparse_len
    from .methods import METHODS

    method = None if args.method == "dense" else args.method
    if method is not None and (method not in METHODS):
        raise UsageError(f"unknown --method {args.method!r}; choose from {sorted(METHODS) + ['dense']}")
    try:
        overrides = parse_overrides(args.set)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if method is None and overrides:
        raise UsageError(f"--set {sorted(overrides)} needs a sparse --method (dense takes no options)")
    if method is not None:
        try:
            resolve_config(method, **overrides)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--set: {err}") from err
    min_sparse_len = default_min_sparse_len(method or "") if args.min_sparse_len is None else args.min_sparse_len
    if min_sparse_len < 0:
        raise UsageError(f"--min-sparse-len must be >= 0, got {min_sparse_len}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    prompt = _read_prompt(args)
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    device = _device(args.device)
    model, tokenizer = _load_model(args.model, device, out=sys.stderr)  # stdout carries only the answer
    if args.chat and getattr(tokenizer, "chat_template", None) is None:
        raise UsageError("--chat needs a tokenizer with a chat template; this model's tokenizer has none")
    result = run_generate(model, tokenizer, prompt, method=method, overrides=overrides,
                          min_sparse_len=min_sparse_len, chat=args.chat, max_new_tokens=args.max_new_tokens)
    counts = ", ".join(f"{n} {route}" for route, n in sorted(result["counts"].items())) or "dense"
    print(f"[{result['prompt_tokens']} prompt tokens, {result['new_tokens']} new tokens in "
          f"{result['seconds']:.1f} s; attention calls: {counts}]", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    """Run a speed suite on the GPU, write JSON + Markdown (+ PNG) under ``--out/<device>/``."""
    import json
    from pathlib import Path

    from .bench.timing import device_slug

    seeds = _seeds(args.seeds)
    if seeds is not None and args.suite != "methods":
        raise UsageError("--seeds applies to the methods suite (the kernel suite draws random q/k/v)")
    if not torch.cuda.is_available():
        print("sparseattn bench needs a CUDA GPU (timings on a CPU would mean nothing).", file=sys.stderr)
        return 2
    lengths = [int(x) for x in args.lengths.split(",")]
    progress = lambda msg: print(f"[bench] {msg}", flush=True)  # noqa: E731
    if args.suite == "kernel":
        from .bench.kernel_suite import run_kernel_suite
        from .bench.report import kernel_table as table

        densities = [float(x) for x in args.densities.split(",")]
        backward = [int(x) for x in args.backward_lengths.split(",")] if args.backward_lengths else []
        result = run_kernel_suite(lengths, densities, q_heads=args.q_heads, kv_heads=args.kv_heads,
                                  head_dim=args.head_dim, block_size=args.block_size, backward_lengths=backward,
                                  share_blocks_in_group=args.share_blocks_in_group, progress=progress)
    else:
        from .bench.method_suite import method_table as table
        from .bench.method_suite import run_method_suite

        result = run_method_suite(args.methods.split(","), lengths, q_heads=args.q_heads, kv_heads=args.kv_heads,
                                  head_dim=args.head_dim, progress=progress, seeds=seeds)
    out_dir = Path(args.out) / device_slug(result["machine"]["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name or args.suite}.json"
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(table(result) + "\n")
    written = [path, path.with_suffix(".md")]
    if args.suite == "kernel":
        from .bench.report import kernel_plot

        png = kernel_plot(result, path.with_suffix(".png"))
        written += [png] if png else []
    print(table(result))
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


# --------------------------------------------------------------------------------------------
# eval, fidelity, viz, memory (the logic lives in sparseattn.evaluation)
# --------------------------------------------------------------------------------------------


def _seeds(text: str | None) -> list[int | None] | None:
    """``--seeds`` of the methods suite (``bench.inputs.parse_seeds``); ``None`` when not given."""
    if text is None:
        return None
    from .bench.inputs import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as err:
        raise UsageError(f"--seeds: {err}") from None


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise UsageError(f"{flag} takes positive integers, got {text!r}")
    return values


def _eval_methods(args) -> dict[str, dict]:
    """``--methods`` and ``--set METHOD.KEY=VALUE`` -> ``{method: options}``, checked before the model loads."""
    from .evaluation.runner import method_options

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        return method_options(args.set, names)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _model_for(args, lengths=()):
    """The model (after every argument is checked), and a check that ``lengths`` fit its context."""
    model, tokenizer = _load_model(args.model, _device(args.device), out=sys.stderr)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and lengths and max(lengths) > limit:
        raise UsageError(f"length {max(lengths)} (prompt, plus 128 tokens of answer for eval) is longer than the "
                         f"model's context ({limit} tokens)")
    return model, tokenizer


def _machine(model) -> dict:
    import transformers

    device = next(model.parameters()).device
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "torch": torch.__version__,
            "transformers": transformers.__version__}


def cmd_eval(args) -> int:
    """RULER-style tasks (and LongBench / InfiniteBench files), dense vs each method; JSON + CSV + MD + PNG."""
    import json

    from .evaluation import ruler
    from .evaluation.report import markdown, summarize, write_reports
    from .evaluation.runner import run_eval

    wall = time.perf_counter()
    if args.report_only:
        from .evaluation.runner import RESULTS_FILE, load_rows

        rows = load_rows(Path(args.out) / RESULTS_FILE)
        if not rows:
            raise UsageError(f"--report-only: no rows in {Path(args.out) / RESULTS_FILE}")
        saved = Path(args.out) / "meta.json"  # written when the run started
        meta = json.loads(saved.read_text()) if saved.is_file() else {"model": rows[0]["settings"]["model"]}
        meta["report_only"] = True
        written = write_reports(rows, args.out, meta)
        print(markdown(rows, summarize(rows), meta))
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    methods = _eval_methods(args)
    tasks = list(ruler.TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in ruler.TASKS]
    if unknown:
        raise UsageError(f"--tasks: unknown task(s) {unknown}; choose from {list(ruler.TASKS)} or 'all'")
    lengths = _ints(args.lengths, "--lengths")
    ppl_lengths = [] if args.ppl_lengths == "none" else (_ints(args.ppl_lengths, "--ppl-lengths")
                                                         if args.ppl_lengths else lengths)
    if args.samples < 1 or args.min_sparse_len < 0 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise UsageError("--samples and --max-new-tokens must be >= 1, --min-sparse-len >= 0")
    if args.haystack not in ("stdlib", "repeat") and not Path(args.haystack).is_dir():
        raise UsageError(f"--haystack must be stdlib, repeat or a folder, got {args.haystack!r}")
    if args.data_dir is not None:
        from .evaluation.external import find_data_files

        try:
            find_data_files(args.data_dir)
        except ValueError as err:
            raise UsageError(str(err)) from err
    # A prompt plus its answer (at most 120 tokens, cwe's) must fit the model's positions.
    model, tokenizer = _model_for(args, [max(lengths) + 128, *ppl_lengths])
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")  # dense = SDPA
    meta = dict(_machine(model), model=args.model, dense=model.config._attn_implementation, tasks=tasks,
                lengths=lengths, samples=args.samples, seed=args.seed, haystack=args.haystack,
                min_sparse_len=args.min_sparse_len, args={k: v for k, v in vars(args).items() if k != "func"})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # for --report-only after a kill
    try:
        rows = run_eval(model, tokenizer, args.out, tasks=tasks, lengths=lengths, samples=args.samples,
                        methods=methods, seed=args.seed, haystack=args.haystack, min_sparse_len=args.min_sparse_len,
                        ppl_lengths=ppl_lengths, data_dir=args.data_dir, max_new_tokens=args.max_new_tokens,
                        model_name=args.model)
    except ValueError as err:
        raise UsageError(str(err)) from err
    meta["wall_s"] = round(time.perf_counter() - wall, 1)
    written = write_reports(rows, args.out, meta)
    print(markdown(rows, summarize(rows), meta))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_fidelity(args) -> int:
    """Recall of exact attention mass and relative output error per layer and head, on real q/k/v."""
    import json

    from .evaluation.fidelity import fidelity_heatmaps, fidelity_table, run_fidelity

    methods = _eval_methods(args)
    try:
        layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise UsageError(f"--layers takes 'all' or comma-separated layer indices, got {args.layers!r}") from None
    model, tokenizer = _model_for(args, [args.length])
    try:
        result = run_fidelity(model, tokenizer, length=args.length, methods=methods, layers=layers,
                              progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ValueError as err:
        raise UsageError(str(err)) from err
    result.update(_machine(model), model=args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "fidelity.md").write_text(fidelity_table(result) + "\n")
    pngs = fidelity_heatmaps(result, out, title=args.model)
    print(fidelity_table(result))
    print("wrote " + ", ".join(str(p) for p in [out / "fidelity.json", out / "fidelity.md", *pngs]))
    return 0


def cmd_viz(args) -> int:
    """The blocks a method selects for one layer and head of a model on real text, as a PNG."""
    from .evaluation.runner import method_options
    from .evaluation.viz import run_viz

    try:
        options = method_options([f"{args.method}.{item}" for item in args.set], [args.method])[args.method]
    except ValueError as err:
        raise UsageError(str(err).replace("METHOD.KEY=VALUE", "KEY=VALUE")) from err
    model, tokenizer = _model_for(args, [args.length])
    path = args.out or f"viz-{args.method}-layer{args.layer}-head{args.head}.png"
    try:
        result = run_viz(model, tokenizer, method=args.method, options=options, layer=args.layer, head=args.head,
                         length=args.length, path=path)
    except (ValueError, RuntimeError) as err:
        raise UsageError(str(err)) from err
    print(f"{args.method}, layer {args.layer}, head {args.head}, {args.length} tokens: density "
          f"{100 * result['density']:.1f}%, recall of the exact attention mass {result['recall']:.4f}")
    print(f"wrote {result['path']}")
    return 0


def cmd_memory(args) -> int:
    """Peak memory of a whole-model prefill: eager, SDPA and each method."""
    import json

    from .evaluation.memory import memory_table, run_memory

    methods = _eval_methods(args)
    lengths = _ints(args.lengths, "--lengths")
    model, tokenizer = _model_for(args, lengths)
    result = run_memory(model, tokenizer, lengths=lengths, methods=methods, min_sparse_len=args.min_sparse_len,
                        progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    result.update(_machine(model), model=args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "memory.md").write_text(memory_table(result) + "\n")
    print(memory_table(result))
    print(f"wrote {out / 'memory.json'}, {out / 'memory.md'}")
    return 0 if result["measure"] is not None else 2


def _add_eval_parsers(sub) -> None:
    from .evaluation.runner import DEFAULT_METHODS

    def common(p, set_help="METHOD.KEY=VALUE"):
        p.add_argument("--model", default="default", help="a Hugging Face model folder, a .gguf file, or 'default' "
                       "(the embedded SmolLM2-135M-Instruct)")
        p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
        p.add_argument("--set", action="append", default=[], metavar=set_help,
                       help=f"a method option, e.g. {'xattention.' if '.' in set_help else ''}threshold=0.9 "
                            "(repeatable)")

    def methods(p):
        p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated sparse methods")

    ev = sub.add_parser("eval", help="accuracy on RULER-style tasks and perplexity: dense vs each method")
    common(ev)
    methods(ev)
    ev.add_argument("--tasks", default="all", help="comma-separated tasks, or 'all'")
    ev.add_argument("--lengths", default="2048", help="comma-separated prompt lengths in tokens")
    ev.add_argument("--samples", type=int, default=2, help="prompts per task and length")
    ev.add_argument("--min-sparse-len", type=int, default=0, help="prefills with fewer keys run dense (default 0)")
    ev.add_argument("--haystack", default="stdlib", help="stdlib, repeat, or a folder of text files")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--ppl-lengths", default=None, help="perplexity text lengths (default: --lengths; 'none')")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="cap on answer tokens (default: each task's)")
    ev.add_argument("--data-dir", default=None, help="a folder of LongBench / InfiniteBench *.jsonl files")
    ev.add_argument("--out", default="benchmarks/results/eval", help="folder of results.jsonl (resumed) and reports")
    ev.add_argument("--report-only", action="store_true", help="only rewrite the reports from --out's results.jsonl")
    ev.set_defaults(func=cmd_eval)

    fi = sub.add_parser("fidelity", help="recall of exact attention mass and output error per layer and head")
    common(fi)
    methods(fi)
    fi.add_argument("--length", type=int, default=2048, help="tokens of standard-library text")
    fi.add_argument("--layers", default="all", help="comma-separated layers, or 'all' (sliding-window ones skipped)")
    fi.add_argument("--out", default="benchmarks/results/fidelity")
    fi.set_defaults(func=cmd_fidelity)

    vz = sub.add_parser("viz", help="a method's selected blocks for one layer and head, as a PNG")
    common(vz, set_help="KEY=VALUE")
    vz.add_argument("--method", default="xattention")
    vz.add_argument("--layer", type=int, default=0)
    vz.add_argument("--head", type=int, default=0, help="query head")
    vz.add_argument("--length", type=int, default=2048, help="tokens of standard-library text")
    vz.add_argument("--out", default=None, metavar="PNG", help="default viz-METHOD-layerL-headH.png")
    vz.set_defaults(func=cmd_viz)

    me = sub.add_parser("memory", help="peak memory of a whole-model prefill: eager, SDPA, each method")
    common(me)
    methods(me)
    me.add_argument("--lengths", default="8192")
    me.add_argument("--min-sparse-len", type=int, default=0)
    me.add_argument("--out", default="benchmarks/results/memory")
    me.set_defaults(func=cmd_memory)


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEMO_METHODS

    parser = argparse.ArgumentParser(prog="sparseattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a real model answers a long passkey prompt, dense and with every method")
    demo.add_argument("--model", default="default", help="a Hugging Face model folder, a .gguf file, or 'default' "
                      "(the embedded SmolLM2-135M-Instruct, downloaded once)")
    demo.add_argument("--context", type=int, default=None, help="prompt tokens (default 2048 on a CPU, 7936 on a "
                      "GPU; the prompt plus the answer must fit the model's positions)")
    demo.add_argument("--methods", default=",".join(DEMO_METHODS),
                      help="comma-separated sparse methods to compare with dense")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    demo.add_argument("--depth", type=float, default=0.5, help="needle position in the haystack, 0..1 (default 0.5)")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                      help="override a method's option, e.g. --set xattention.threshold=0.9 (repeatable)")
    demo.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    demo.set_defaults(func=cmd_demo)

    generate = sub.add_parser("generate", help="generate from a prompt (file or stdin) with sparse prefill")
    generate.add_argument("--model", default="default", help="a Hugging Face model folder, a .gguf file, or "
                          "'default' (the embedded SmolLM2-135M-Instruct)")
    generate.add_argument("--method", default="xattention", help="a sparse method, or 'dense' for the model's own "
                          "attention (default xattention)")
    generate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override an option of the method, e.g. --set threshold=0.9 (repeatable)")
    generate.add_argument("--prompt-file", default=None, metavar="PATH", help="read the prompt from PATH "
                          "('-' or omitted: stdin)")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--min-sparse-len", type=int, default=None, help="prefills with fewer keys run dense "
                          "(default: the method's crossover measured on the H100, e.g. 16384 for xattention; 0 = always sparse)")
    generate.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    generate.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="speed suite against the strongest peers (GPU)")
    bench.add_argument("suite", choices=["kernel", "methods"],
                       help="kernel: block-sparse kernel vs cuDNN/FA2/Flex; methods: each method end to end")
    bench.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    bench.add_argument("--methods", default="xattention,flexprefill,minference,streaming",
                       help="methods suite: registered method names")
    bench.add_argument("--seeds", default=None,
                       help="methods suite: seeds of the LLM-like input, e.g. L,1,2 (L = the length; default: L only)")
    bench.add_argument("--densities", default="0.05,0.1,0.2,0.5")
    bench.add_argument("--backward-lengths", default="8192,32768")
    bench.add_argument("--q-heads", type=int, default=32)
    bench.add_argument("--kv-heads", type=int, default=8)
    bench.add_argument("--head-dim", type=int, default=128)
    bench.add_argument("--block-size", type=int, default=128)
    bench.add_argument("--share-blocks-in-group", action="store_true",
                       help="kernel suite: draw random blocks once per GQA group instead of once per head")
    bench.add_argument("--out", default="benchmarks/results")
    bench.add_argument("--name", default=None, help="file name (default: the suite's name)")
    bench.set_defaults(func=cmd_bench)

    from .calibrate import add_profile_parser
    from .search import add_search_parser

    add_profile_parser(sub)  # sparseattn profile: per-(layer, head) XAttention thresholds
    add_search_parser(sub)  # sparseattn search: per-(layer, head) MInference patterns
    _add_eval_parsers(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except UsageError as err:
        print(f"sparseattn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
