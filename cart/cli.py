"""The ``cart`` command line: one thin Typer command per stage.

Heavy libraries (torch, transformers) are imported inside the stage functions, so ``cart
--help`` answers at once. Errors caused by input (``CartError``) and usage errors print one line
on stderr and exit non-zero; stdout carries data only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cart import __version__
from cart.io import CartError

app = typer.Typer(
    name="cart",
    help="Turn a large text corpus into a cartridge (a small trained KV cache) with "
         "self-study, and answer queries with it. Every stage reads files or stdin (-) and "
         "writes files or stdout. See man cart(1) and cart-formats(5).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model: a Hugging Face folder, a .gguf file, a model id in the local "
                          "HF cache, or 'smollm2' (the embedded default).",
    show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or info on stderr "
                                                               "(errors still shown).")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="TOML or JSON file of settings: a table named after the command "
                     "([chunk], [synth] ...) or top-level keys; flags given on the command line "
                     "win.", show_default=False)]


def _version(value: bool) -> None:
    if value:
        print(f"cart {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False):
    pass


@app.command("chunk")
def chunk_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Corpus files or directories (recursive, text files only), or - for stdin.",
        show_default=False)] = None,
    num_chunks: Annotated[Optional[int], typer.Option(
        "-n", "--num-chunks", help="Number of windows [random: enough to cover the corpus "
                                   "once on average; sequential: all].", show_default=False)] = None,
    mode: Annotated[Optional[str], typer.Option(
        "--mode", help="random (uniform lengths and starts) or sequential. [default: random]",
        show_default=False)] = None,
    min_tokens: Annotated[Optional[int], typer.Option(
        "--min-tokens", help="Shortest window in tokens. [default: 512]", show_default=False)] = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", help="Longest window in tokens. [default: 4096]", show_default=False)] = None,
    overlap: Annotated[Optional[int], typer.Option(
        "--overlap", help="Sequential mode: tokens shared by consecutive windows. [default: 0]",
        show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="Random seed (same seed and corpus = same chunks). [default: 0]",
        show_default=False)] = None,
    description: Annotated[Optional[str], typer.Option(
        "--description", help="Text describing the corpus, stored with each chunk and put "
                              "before it in self-study prompts.", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option(
        "-o", "--output", help="Output JSONL file (written atomically) or - for stdout.",
        show_default="stdout")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
):
    """Cut a corpus into token windows (cart.chunk/1 JSONL on stdout or -o)."""
    from cart.chunk import ChunkConfig, chunk_corpus
    from cart.config import resolve
    from cart.io import Console, check_outputs, write_jsonl

    console = Console(quiet)
    cfg = resolve(ChunkConfig, config, "chunk", mode=mode, num_chunks=num_chunks,
                  min_tokens=min_tokens, max_tokens=max_tokens, overlap=overlap, seed=seed,
                  description=description)
    if not inputs:
        if sys.stdin.isatty():
            raise CartError("no input: give corpus files or directories, or - for stdin")
        inputs = ["-"]
    check_outputs({"-o": output}, inputs)
    records = chunk_corpus(inputs, cfg, model, console)
    write_jsonl(records, output)


def _opt(flags: str | tuple[str, ...], help: str):
    """An optional flag whose absence (None) lets the config file / dataclass default apply."""
    names = (flags,) if isinstance(flags, str) else flags
    return typer.Option(*names, help=help, show_default=False)


# The generation runtime, shared by the stages that generate (synth, eval, serve).
EngineOpt = Annotated[Optional[str], _opt("--engine", "Model runtime: transformers or vllm "
                                                      "(needs vLLM: pip install 'cart[vllm]'). "
                                                      "[default: transformers]")]
EngineDtypeOpt = Annotated[Optional[str], _opt("--dtype", "float32, bfloat16 or float16. "
                                                          "[default: float32]")]
EngineDeviceOpt = Annotated[Optional[str], _opt("--device", "cpu, cuda, cuda:N ... or auto (cuda "
                                                            "when available). [default: auto]")]
StopLoopsOpt = Annotated[Optional[bool], typer.Option(
    "--stop-loops/--no-stop-loops", help="Cut a generated message once its last block of tokens "
    "has repeated 3 times, dropping the repeats (small models loop until the token cap). "
    "[default: --stop-loops]", show_default=False)]


@app.command("synth")
def synth_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Corpus files/directories (chunked here, as cart chunk does) or cart.chunk/1 "
             "JSONL files, or - for stdin (either kind).", show_default=False)] = None,
    num_convos: Annotated[Optional[int], _opt(("-n", "--num-convos"),
                                              "Conversations to generate. [default: 96]")] = None,
    turns: Annotated[Optional[int], _opt("--turns", "Back-and-forths per conversation "
                                                    "(paper: 1). [default: 1]")] = None,
    seed: Annotated[Optional[int], _opt("--seed", "Random seed: same seed and inputs = same "
                                                  "output. [default: 0]")] = None,
    seed_prompts: Annotated[Optional[str], _opt(
        "--seed-prompts", "mixed (the paper's five generic types, one per conversation), "
                          "generic (single-prompt ablation), a comma-separated list of types, "
                          "or a .txt/.jsonl file of your own. [default: mixed,recall]")] = None,
    temperature_a: Annotated[Optional[float], _opt("--temperature-a", "Sampling temperature of A "
                                                   "(the question writer). [default: 0.6]")] = None,
    max_tokens_a: Annotated[Optional[int], _opt("--max-tokens-a", "Token cap of A's messages. "
                                                "[default: 64]")] = None,
    temperature_b: Annotated[Optional[float], _opt("--temperature-b", "Sampling temperature of B "
                                                   "(the answerer; 0 = greedy). [default: 0]")] = None,
    max_tokens_b: Annotated[Optional[int], _opt("--max-tokens-b", "Token cap of B's messages. "
                                                "[default: 192]")] = None,
    top_k: Annotated[Optional[int], _opt("--top-k", "Teacher log-probs kept per assistant token. "
                                                    "[default: 20]")] = None,
    logprob_mass: Annotated[Optional[float], _opt(
        "--logprob-mass", "Of the top-k, keep candidates until this cumulative probability. "
                          "[default: 0.99]")] = None,
    stop_loops: StopLoopsOpt = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "Conversations generated together. "
                                                              "[default: 16]")] = None,
    mode: Annotated[Optional[str], _opt("--mode", "Chunking of corpus inputs: random (one window "
                                                  "per conversation) or sequential. [default: sequential]")] = None,
    min_tokens: Annotated[Optional[int], _opt("--min-tokens", "Chunking: shortest window. "
                                                              "[default: 128]")] = None,
    max_tokens: Annotated[Optional[int], _opt("--max-tokens", "Chunking: longest window. "
                                                              "[default: 256]")] = None,
    overlap: Annotated[Optional[int], _opt("--overlap", "Chunking (sequential): overlap. "
                                                        "[default: 0]")] = None,
    description: Annotated[Optional[str], _opt("--description", "Chunking: text describing the "
                                               "corpus, put before each chunk.")] = None,
    engine: EngineOpt = None,
    dtype: EngineDtypeOpt = None,
    device: EngineDeviceOpt = None,
    shard: Annotated[Optional[str], _opt("--shard", "i/n: do the i-th of n disjoint parts "
                                                    "(concatenating parts 0..n-1 = the whole run).")] = None,
    output: Annotated[Optional[str], typer.Option(
        "-o", "--output", help="Output JSONL file, or - for stdout. A file is built as "
                               "FILE.partial and renamed when done; rerunning the same command "
                               "resumes it.", show_default="stdout")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
):
    """Self-study: the model quizzes itself about chunks (cart.convo/1 JSONL with teacher top-k)."""
    from cart.config import resolve
    from cart.io import Console, check_outputs
    from cart.synth import SynthConfig, parse_shard, synthesize

    console = Console(quiet)
    cfg = resolve(SynthConfig, config, "synth", num_convos=num_convos, turns=turns, seed=seed,
                  seed_prompts=seed_prompts, temperature_a=temperature_a,
                  max_tokens_a=max_tokens_a, temperature_b=temperature_b,
                  max_tokens_b=max_tokens_b, top_k=top_k, logprob_mass=logprob_mass, stop_loops=stop_loops,
                  batch_size=batch_size, mode=mode, min_tokens=min_tokens,
                  max_tokens=max_tokens, overlap=overlap, description=description,
                  engine=engine, dtype=dtype, device=device)
    shard_ix = parse_shard(shard)
    if not inputs:
        if sys.stdin.isatty():
            raise CartError("no input: give corpus files/directories or chunk JSONL, or - for stdin")
        inputs = ["-"]
    check_outputs({"-o": output}, [*inputs, cfg.seed_prompts])
    synthesize(inputs, cfg, model, output, shard_ix, console)


@app.command("distill")
def distill_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="cart.convo/1 JSONL files from cart synth, or - for stdin.", show_default=False)] = None,
    tokens: Annotated[Optional[int], _opt(("-p", "--tokens"), "Cartridge length p in KV positions "
                                          "(the frozen sink included). [default: 512]")] = None,
    init: Annotated[Optional[str], _opt(
        "--init", "Initial KV: attention-match (the corpus's KV cache compacted to p positions, as "
                  "cart compact does), corpus (the model's KV of the corpus's first p tokens), "
                  "random-tokens (KV of random token ids), random-vectors (Gaussian), text (KV of "
                  "--init-text), or a .safetensors cartridge (or PEFT adapter folder) to continue "
                  "training. "
                  "[default: attention-match]")] = None,
    init_text: Annotated[Optional[str], _opt("--init-text", "The text file --init text "
                                                            "initialises from.")] = None,
    objective: Annotated[Optional[str], _opt(
        "--objective", "kl (distil the stored teacher top-k) or ntp (next-token prediction "
                       "ablation). [default: kl]")] = None,
    lr: Annotated[Optional[float], _opt("--lr", "Adam learning rate, constant. [default: 0.05]")] = None,
    epochs: Annotated[Optional[int], _opt("--epochs", "Passes over the conversations. "
                                                      "[default: 2]")] = None,
    steps: Annotated[Optional[int], _opt("--steps", "Optimizer steps (overrides --epochs; the "
                                                    "data repeats in fresh shuffles).")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "Packed rows per optimizer step, "
                                              "over all processes. [default: 1]")] = None,
    seq_len: Annotated[Optional[int], _opt("--seq-len", "Tokens per packed row (1 = no packing: "
                                           "one conversation per row). [default: 1024]")] = None,
    grad_accum: Annotated[Optional[int], _opt("--grad-accum", "Micro-steps per optimizer step "
                                              "(same result, less memory). [default: 1]")] = None,
    seed: Annotated[Optional[int], _opt("--seed", "Shuffling and random inits. [default: 0]")] = None,
    dtype: Annotated[Optional[str], _opt("--dtype", "Compute: bfloat16 (autocast; the cartridge "
                                         "and Adam stay float32), float32, or auto (bfloat16 on "
                                         "GPUs and CPUs with native bfloat16, else float32). "
                                         "[default: auto]")] = None,
    device: Annotated[Optional[str], _opt("--device", "cpu, cuda, cuda:N or auto. "
                                                      "[default: auto]")] = None,
    save_every: Annotated[Optional[int], _opt("--save-every", "Checkpoint every N steps. "
                                                              "[default: 50]")] = None,
    frozen_tokens: Annotated[Optional[int], _opt("--frozen-tokens", "Leading positions kept "
                                                 "frozen (the attention sink). [default: 1]")] = None,
    checkpoint: Annotated[Optional[str], _opt(
        "--checkpoint", "Checkpoint file (cartridge + Adam state); a rerun resumes from it. "
                        "[default: OUTPUT.ckpt with -o; none on stdout]")] = None,
    log: Annotated[Optional[str], _opt("--log", "Write one JSON line per step (loss, kl, "
                                                "tokens, tokens/s) to this file.")] = None,
    output: Annotated[Optional[str], typer.Option(
        "-o", "--output", help="Cartridge file (.safetensors), written atomically, or - for "
                               "stdout. [default: stdout when it is not a terminal, else "
                               "cartridge-CORPUS-pP.safetensors]", show_default=False)] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
):
    """Train a cartridge on self-study conversations by context distillation."""
    from cart.cartridge import read_metadata
    from cart.config import resolve
    from cart.distill import DistillConfig, distill, init_is_cartridge
    from cart.io import Console, check_outputs

    console = Console(quiet)
    if tokens is None and init is not None and init_is_cartridge(init) and Path(init).exists():
        tokens = read_metadata(init)["p"]  # continue training at the cartridge's own size
    cfg = resolve(DistillConfig, config, "distill", tokens=tokens, init=init, init_text=init_text,
                  objective=objective, lr=lr, epochs=epochs, steps=steps, batch_size=batch_size,
                  seq_len=seq_len, grad_accum=grad_accum, seed=seed, dtype=dtype, device=device,
                  save_every=save_every, frozen_tokens=frozen_tokens)
    if not inputs:
        if sys.stdin.isatty():
            raise CartError("no input: give conversation JSONL files (cart synth), or - for stdin")
        inputs = ["-"]
    if output is None and sys.stdout.isatty():
        output = "auto"  # never binary onto a terminal: a file named after the corpus
    # fail now, not after training
    check_outputs({"-o": None if output == "auto" else output, "--log": log,
                   "--checkpoint": checkpoint}, [*inputs, cfg.init, cfg.init_text])
    distill(inputs, cfg, model, output, checkpoint, log, console)


@app.command("compact")
def compact_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Corpus files or directories (text files), or - for stdin.", show_default=False)] = None,
    tokens: Annotated[Optional[int], _opt(("-p", "--tokens"), "Cartridge length p in KV positions "
                                          "(the sink included). [default: 512]")] = None,
    window: Annotated[Optional[int], _opt("--window", "Corpus tokens per window; a longer corpus "
                                          "is compacted window by window and joined. [default: "
                                          "the most the model's context allows]")] = None,
    max_queries: Annotated[Optional[int], _opt("--max-queries", "Reference query vectors per KV "
                                               "head in each layer's fit. [default: 4096]")] = None,
    biases: Annotated[Optional[bool], _opt("--biases/--no-biases", "Fit a per-key attention "
                                           "bias too (the transformers engine applies it; vLLM "
                                           "refuses such cartridges). [default: no-biases]")] = None,
    device: Annotated[Optional[str], _opt("--device", "cpu, cuda, cuda:N or auto. "
                                                      "[default: auto]")] = None,
    output: Annotated[Optional[str], typer.Option(
        "-o", "--output", help="Cartridge file (.safetensors), written atomically, or - for "
                               "stdout. [default: stdout when it is not a terminal]",
        show_default=False)] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
):
    """Compact the corpus's KV cache into a cartridge by attention matching (no training)."""
    from cart.compact import CompactConfig, compact_corpus
    from cart.config import resolve
    from cart.io import Console, check_outputs

    cfg = resolve(CompactConfig, config, "compact", tokens=tokens, window=window,
                  max_queries=max_queries, biases=biases, device=device)
    if not inputs:
        if sys.stdin.isatty():
            raise CartError("no input: give corpus files or directories, or - for stdin")
        inputs = ["-"]
    if output is None and sys.stdout.isatty():
        raise CartError("no output: give -o FILE (a cartridge is not written to a terminal)")
    check_outputs({"-o": output}, inputs)
    compact_corpus(inputs, cfg, model, output, Console(quiet))


@app.command("eval")
def eval_command(
    questions: Annotated[str, typer.Argument(
        help="Question set: cart.questions/1 JSONL, or - for stdin.", show_default=False)],
    cartridge: Annotated[Optional[list[str]], typer.Option(
        "--cartridge", "-c", help="A cartridge file or PEFT adapter folder to evaluate "
                                  "(repeatable; each is one method).",
        show_default=False)] = None,
    icl: Annotated[Optional[list[str]], typer.Option(
        "--icl", help="Corpus for in-context learning, read as cart chunk reads it: a file, a "
                      "directory (recursive, text files only) or - for stdin; the whole corpus "
                      "goes in the system message (repeatable: joined in order). Refused if it "
                      "does not fit the model's context.", show_default=False)] = None,
    truncate: Annotated[Optional[list[int]], typer.Option(
        "--truncate", help="Also ICL on the corpus's first N tokens (the same-memory baseline; "
                           "repeatable; needs --icl).", show_default=False)] = None,
    no_context: Annotated[bool, typer.Option(
        "--no-context", help="Also answer with nothing before the question.")] = False,
    max_new_tokens: Annotated[Optional[int], _opt("--max-new-tokens", "Token cap of each answer. "
                                                  "[default: 64]")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "Questions generated together. "
                                                              "[default: 16]")] = None,
    temperature: Annotated[Optional[float], _opt("--temperature", "Sampling temperature (0 = "
                                                 "greedy). [default: 0]")] = None,
    seed: Annotated[Optional[int], _opt("--seed", "Sampling seed (with --temperature > 0). "
                                                  "[default: 0]")] = None,
    stop_loops: StopLoopsOpt = None,
    engine: EngineOpt = None,
    dtype: EngineDtypeOpt = None,
    device: EngineDeviceOpt = None,
    summary: Annotated[Optional[str], _opt("--summary", "Write the per-method summary (score, "
                                           "KV bytes, compression vs ICL, tokens/s) as JSON "
                                           "here.")] = None,
    plot: Annotated[Optional[str], _opt("--plot", "Write a PNG of quality against KV memory "
                                                  "(log scale) here.")] = None,
    table: Annotated[Optional[bool], typer.Option(
        "--table/--no-table", help="Print the side-by-side table on stderr. [default: when "
        "stderr is a terminal]", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option(
        "-o", "--output", help="Per-question results (cart.result/1 JSONL) to this file instead "
                               "of stdout; built as FILE.partial, and rerunning the same command "
                               "resumes it.", show_default="stdout")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
):
    """Score cartridges against no context, ICL and truncated ICL on a question set."""
    from cart.config import resolve
    from cart.eval import EvalConfig, evaluate
    from cart.io import Console

    console = Console(quiet)
    cfg = resolve(EvalConfig, config, "eval", max_new_tokens=max_new_tokens,
                  batch_size=batch_size, temperature=temperature, seed=seed,
                  stop_loops=stop_loops, engine=engine, dtype=dtype, device=device)
    evaluate(questions, cfg, model, no_context=no_context, icl=icl or [], truncate=truncate or [],
             cartridges=cartridge or [], output=output, summary_path=summary, plot_path=plot,
             table=table,
             console=console)


@app.command("compose")
def compose_command(
    cartridges: Annotated[list[str], typer.Argument(
        help="Two or more cartridge files or PEFT adapter folders, in order (the first one's "
             "attention sink is kept); one of them may be - for stdin.", show_default=False)],
    output: Annotated[Optional[str], typer.Option(
        "-o", "--output", help="The composed cartridge (.safetensors), written atomically, or - "
                               "for stdout. [default: stdout when it is not a terminal]",
        show_default=False)] = None,
    sinks: Annotated[str, typer.Option(
        "--sinks", help="one: keep only the first part's attention sink (later parts' sinks are "
                        "dropped); all: keep every part whole, its sink included.")] = "one",
    quiet: QuietOpt = False,
):
    """Concatenate cartridges into one (one attention sink, parts recorded)."""
    from cart.compose import compose_files
    from cart.io import Console, check_outputs

    if output is None and sys.stdout.isatty():
        raise CartError("no output: give -o FILE (a cartridge is not written to a terminal)")
    check_outputs({"-o": output}, cartridges)
    compose_files(cartridges, output, Console(quiet), sinks)


@app.command("convert")
def convert_command(
    source: Annotated[str, typer.Argument(
        help="A cart cartridge file (.safetensors; - for stdin) or a PEFT CARTRIDGE adapter "
             "folder (adapter_config.json + adapter_model.safetensors).", show_default=False)],
    to: Annotated[Optional[str], _opt("--to", "peft (an adapter folder that PEFT's "
                                              "PeftModel.from_pretrained loads) or cart (a "
                                              "cartridge file). [default: the other format]")] = None,
    output: Annotated[Optional[str], typer.Option(
        "-o", "--output", help="--to peft: the adapter folder, built beside it and renamed into "
                               "place. --to cart: the cartridge file, written atomically, or - "
                               "for stdout. [default: stdout when it is not a terminal]",
        show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="The base model: the cartridge is checked against it, and an "
                              "adapter's base_model_name_or_path is taken from it (PEFT to "
                              "cart: when the adapter's own base model is not found locally). "
                              "[default: the model the input names]", show_default=False)] = None,
    quiet: QuietOpt = False,
):
    """Convert a cartridge to a Hugging Face PEFT CARTRIDGE adapter folder, or back."""
    from cart.convert import convert
    from cart.io import Console

    to_cart = to == "cart" or (to is None and source != "-" and Path(source).is_dir())
    if to_cart and output is None and sys.stdout.isatty():
        raise CartError("no output: give -o FILE (a cartridge is not written to a terminal)")
    convert(source, output, to, model, Console(quiet))


@app.command("info")
def info_command(
    cartridge: Annotated[str, typer.Argument(help="A cartridge file (.safetensors), a PEFT "
                                                  "adapter folder, or - for stdin.",
                                             show_default=False)],
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Also check that the cartridge fits this model (refused if not).",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of "
                                                         "the listing.")] = False,
):
    """Show a cartridge's metadata, size, and compression against the corpus in context."""
    from cart.info import cartridge_info, format_info

    info = cartridge_info(cartridge, model)
    if as_json:
        from cart.io import dumps

        sys.stdout.buffer.write(dumps(info))
    else:
        sys.stdout.write(format_info(info))


@app.command("serve")
def serve_command(
    cartridges: Annotated[Optional[str], _opt("--cartridges", "Directory of cartridges "
                                              "(.safetensors, or PEFT adapter folders); a request "
                                              "names one by its file name without the extension "
                                              "(or its folder name). Files added or replaced "
                                              "later are picked up without a restart.")] = None,
    model: ModelOpt = None,
    host: Annotated[Optional[str], _opt("--host", "Address to listen on; 0.0.0.0 opens the "
                                                  "server to the network. [default: 127.0.0.1]")] = None,
    port: Annotated[Optional[int], _opt("--port", "TCP port (0: any free one, shown on stderr). "
                                                  "[default: 8000]")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="CART_API_KEY", show_envvar=True, show_default=False,
        help="Require 'Authorization: Bearer KEY' on /v1/... (prefer the environment variable: "
             "a flag shows in the process list).")] = None,
    max_tokens: Annotated[Optional[int], _opt("--max-tokens", "Cap on a request's max_tokens, "
                                              "and the default when a chat request gives none. "
                                              "[default: 1024]")] = None,
    max_prompt_tokens: Annotated[Optional[int], _opt("--max-prompt-tokens", "Longest prompt "
                                                     "accepted, in tokens (0: the model's "
                                                     "context). [default: 0]")] = None,
    max_body_bytes: Annotated[Optional[str], _opt("--max-body-bytes", "Largest request body "
                                                  "(e.g. 1MiB); larger is refused with 413. "
                                                  "[default: 1MiB]")] = None,
    max_concurrent: Annotated[Optional[int], _opt("--max-concurrent", "Requests in flight "
                                                  "(decoding + waiting); more are refused with "
                                                  "429. [default: 64]")] = None,
    max_batch: Annotated[Optional[int], _opt("--max-batch", "Requests decoded together in one "
                                             "step; the rest wait their turn. [default: 32]")] = None,
    cache_bytes: Annotated[Optional[str], _opt("--cache-bytes", "Memory for loaded cartridges "
                                               "(least recently used are dropped first), e.g. "
                                               "4GiB. [default: 4GiB]")] = None,
    shutdown_timeout: Annotated[Optional[float], _opt("--shutdown-timeout", "Seconds in-flight "
                                                      "requests get to finish after SIGTERM or "
                                                      "Ctrl-C. [default: 120]")] = None,
    request_timeout: Annotated[Optional[float], _opt("--request-timeout", "Seconds a client "
                                                     "gets to send a request's headers, and "
                                                     "then its body; slower connections are "
                                                     "closed. [default: 30]")] = None,
    engine: EngineOpt = None,
    dtype: EngineDtypeOpt = None,
    device: EngineDeviceOpt = None,
    config: ConfigOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on "
                                                              "stderr (no request log).")] = False,
):
    """Serve cartridges over an OpenAI-compatible HTTP API (chat, completions, models)."""
    from cart.config import resolve
    from cart.io import Console
    from cart.serve import ServeConfig, serve

    if api_key is None and os.environ.get("CART_API_KEY") == "":
        api_key = ""  # click takes an empty variable for unset: refuse it as --api-key ""
    cfg = resolve(ServeConfig, config, "serve", cartridges=cartridges, host=host, port=port,
                  api_key=api_key, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                  max_body_bytes=max_body_bytes,
                  max_concurrent=max_concurrent, max_batch=max_batch,
                  cache_bytes=cache_bytes,
                  shutdown_timeout=shutdown_timeout, request_timeout=request_timeout,
                  engine=engine, dtype=dtype, device=device)
    serve(cfg, model, quiet=quiet, console=Console(quiet))


def _fail(message: str, code: int) -> None:
    print(f"cart: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _usage_exceptions() -> tuple[type[BaseException], ...]:
    # Typer >= 0.20 vendors click (typer.TyperException); older ones raise click's own.
    kinds: list[type[BaseException]] = [getattr(typer, "TyperException", CartError)]
    try:
        import click

        kinds.append(click.ClickException)
    except ImportError:
        pass
    return tuple(kinds)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning known errors into one line and an exit code."""
    command = typer.main.get_command(app)
    usage_errors = _usage_exceptions()
    try:
        code = command.main(args=argv, prog_name="cart", standalone_mode=False)
    except CartError as e:
        _fail(str(e), e.exit_code)
    except usage_errors as e:
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `cart`: show the help
            print(ctx.get_help() if ctx else e.format_message(), file=sys.stderr)
            sys.exit(2)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(f"{e.format_message()}{where}", getattr(e, "exit_code", 2))
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except BrokenPipeError:  # `cart chunk ... | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except Exception as e:  # a bug: keep it to one line unless asked for the traceback
        from cart.io import WRITE_ERRNOS

        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:  # a full disk, not a bug
            _fail(f"{e.filename + ': ' if e.filename else ''}cannot write: {e.strerror}", 1)
        if os.environ.get("CART_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (set CART_DEBUG=1 for a traceback)", 70)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
