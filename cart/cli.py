"""The ``cart`` command line: one thin Typer command per stage.

Heavy libraries (torch, transformers) are imported inside the stage functions, so ``cart
--help`` answers at once. Errors caused by input (``CartError``) and usage errors print one line
on stderr and exit non-zero; stdout carries data only.

A stage's settings are the fields of its config dataclass, the one place their defaults are
written: an option named after a field shows its default (``_Stage``) and sets it (``_resolve``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand

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


def config_class(stage: str) -> type:
    """A stage's settings dataclass, ``cart.<stage>.<Stage>Config``. Imported when needed, so
    ``cart --help`` loads no stage module."""
    return getattr(importlib.import_module(f"cart.{stage}"), f"{stage.title()}Config")


def shown_default(name: str, value: Any) -> str | None:
    """A field's default as it is written on the command line (None: nothing to show)."""
    if isinstance(value, bool):
        return ("--" if value else "--no-") + name.replace("_", "-")
    if isinstance(value, float):
        return f"{value:g}"
    if name.endswith("_bytes") and isinstance(value, int) and value % (1 << 20) == 0:
        return f"{value >> 30}GiB" if value % (1 << 30) == 0 else f"{value >> 20}MiB"
    return None if value in (None, "", dataclasses.MISSING) else str(value)


class _Stage(TyperCommand):
    """A stage command: its options named after a field of the stage's config dataclass set that
    field, and their help ends in the field's default, written nowhere else."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for field in dataclasses.fields(config_class(self.name)):
            shown = shown_default(field.name, field.default)
            for param in self.params:
                if param.name == field.name and shown and "[default:" not in param.help:
                    param.help += f" [default: {shown}]"
        super().format_help(ctx, formatter)


def _resolve(stage: str, given: dict[str, Any]) -> Any:
    """The stage's settings: its defaults, the ``--config`` file, then the options given
    (``given``: the command's ``locals()``; a parameter named after a field is its option)."""
    from cart.config import resolve

    cls = config_class(stage)
    names = {f.name for f in dataclasses.fields(cls)}
    return resolve(cls, given["config"], stage, **{k: v for k, v in given.items() if k in names})


def _inputs(inputs: list[str] | None, what: str) -> list[str]:
    """The inputs given, or stdin (-) when none are and stdin is not a terminal."""
    if not inputs and sys.stdin.isatty():
        raise CartError(f"no input: give {what}, or - for stdin")
    return inputs or ["-"]


def _not_to_terminal(output: str | None) -> None:
    if output is None and sys.stdout.isatty():
        raise CartError("no output: give -o FILE (a cartridge is not written to a terminal)")


def _opt(flags: str | tuple[str, ...], help: str):
    """An optional flag whose absence (None) lets the config file / dataclass default apply."""
    names = (flags,) if isinstance(flags, str) else flags
    return typer.Option(*names, help=help, show_default=False)


# -- options shared by several commands (a stage's own default is added by _Stage) ------------
ModelOpt = Annotated[Optional[str], _opt(("--model", "-m"), "Model: a Hugging Face folder, a "
                                         ".gguf file, a model id in the local HF cache, or "
                                         "'smollm2' (the embedded default).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or info on stderr "
                                                               "(errors still shown).")]
ConfigOpt = Annotated[Optional[Path], _opt("--config", "TOML or JSON file of settings: a table "
                                           "named after the command ([chunk], [synth] ...) or "
                                           "top-level keys; flags given on the command line win.")]
SeedOpt = Annotated[Optional[int], _opt("--seed", "Random seed: the same seed and inputs give "
                                                  "the same output.")]
# chunking: cart chunk, and cart synth of corpus inputs
ModeOpt = Annotated[Optional[str], _opt("--mode", "Chunking: random (uniform window lengths and "
                                                  "starts; synth: one window per conversation) "
                                                  "or sequential.")]
MinTokensOpt = Annotated[Optional[int], _opt("--min-tokens", "Chunking: shortest window in tokens.")]
MaxTokensOpt = Annotated[Optional[int], _opt("--max-tokens", "Chunking: longest window in tokens.")]
OverlapOpt = Annotated[Optional[int], _opt("--overlap", "Chunking, sequential mode: tokens "
                                                        "shared by consecutive windows.")]
DescriptionOpt = Annotated[Optional[str], _opt("--description", "Text describing the corpus, "
                                               "stored with each chunk and put before it in "
                                               "self-study prompts.")]
# the generation runtime of synth, eval and serve
EngineOpt = Annotated[Optional[str], _opt("--engine", "Model runtime: transformers, vllm (needs "
                                                      "vLLM: pip install 'cart[vllm]') or auto "
                                                      "(vllm on a GPU where installed).")]
DtypeOpt = Annotated[Optional[str], _opt("--dtype", "auto (bfloat16 on a GPU, else float32), "
                                                    "float32, bfloat16 or float16.")]
DeviceOpt = Annotated[Optional[str], _opt("--device", "cpu, cuda, cuda:N ... or auto (cuda when "
                                                      "available).")]
StopLoopsOpt = Annotated[Optional[bool], _opt(
    "--stop-loops/--no-stop-loops", "Cut a generated message once its last block of tokens "
    "has repeated 3 times, dropping the repeats (small models loop until the token cap).")]
# cartridges
TokensOpt = Annotated[Optional[int], _opt(("-p", "--tokens"), "Cartridge length p in KV "
                                          "positions (the attention sink included).")]
CartridgeOutOpt = Annotated[Optional[str], _opt(("-o", "--output"), "Cartridge file "
                                                "(.safetensors), written atomically, or - for "
                                                "stdout. [default: stdout when it is not a "
                                                "terminal]")]


def _version(value: bool) -> None:
    if value:
        print(f"cart {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False):
    pass


@app.command("chunk", cls=_Stage)
def chunk_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Corpus files or directories (recursive, text files only), or - for stdin.",
        show_default=False)] = None,
    num_chunks: Annotated[Optional[int], _opt(("-n", "--num-chunks"), "Number of windows "
                                              "[random: enough to cover the corpus once on "
                                              "average; sequential: all].")] = None,
    mode: ModeOpt = None,
    min_tokens: MinTokensOpt = None,
    max_tokens: MaxTokensOpt = None,
    overlap: OverlapOpt = None,
    seed: SeedOpt = None,
    description: DescriptionOpt = None,
    output: Annotated[Optional[str], typer.Option(
        "-o", "--output", help="Output JSONL file (written atomically) or - for stdout.",
        show_default="stdout")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
):
    """Cut a corpus into token windows (cart.chunk/1 JSONL on stdout or -o)."""
    from cart.chunk import chunk_corpus
    from cart.io import Console, check_outputs, write_jsonl

    console = Console(quiet)
    cfg = _resolve("chunk", locals())
    inputs = _inputs(inputs, "corpus files or directories")
    check_outputs({"-o": output}, inputs)
    write_jsonl(chunk_corpus(inputs, cfg, model, console), output)


@app.command("synth", cls=_Stage)
def synth_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Corpus files/directories (chunked here, as cart chunk does) or cart.chunk/1 "
             "JSONL files, or - for stdin (either kind).", show_default=False)] = None,
    num_convos: Annotated[Optional[int], _opt(("-n", "--num-convos"),
                                              "Conversations to generate.")] = None,
    turns: Annotated[Optional[int], _opt("--turns", "Back-and-forths per conversation "
                                                    "(paper: 1).")] = None,
    seed: SeedOpt = None,
    seed_prompts: Annotated[Optional[str], _opt(
        "--seed-prompts", "recall (this project's direct types: recite, facts, qa, cloze; "
                          "the default), mixed (the paper's five generic types), generic "
                          "(single-prompt ablation), a comma-separated list of types, e.g. "
                          "mixed,recall, or a .txt/.jsonl file of your own.")] = None,
    temperature_a: Annotated[Optional[float], _opt(
        "--temperature-a", "Sampling temperature of A (the question writer).")] = None,
    max_tokens_a: Annotated[Optional[int], _opt("--max-tokens-a", "Token cap of A's messages.")] = None,
    temperature_b: Annotated[Optional[float], _opt(
        "--temperature-b", "Sampling temperature of B (the answerer; 0 = greedy).")] = None,
    max_tokens_b: Annotated[Optional[int], _opt("--max-tokens-b", "Token cap of B's messages.")] = None,
    top_k: Annotated[Optional[int], _opt("--top-k", "Teacher log-probs kept per assistant "
                                                    "token.")] = None,
    logprob_mass: Annotated[Optional[float], _opt(
        "--logprob-mass", "Of the top-k, keep candidates until this cumulative probability.")] = None,
    stop_loops: StopLoopsOpt = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "Conversations generated "
                                                              "together.")] = None,
    mode: ModeOpt = None,
    min_tokens: MinTokensOpt = None,
    max_tokens: MaxTokensOpt = None,
    overlap: OverlapOpt = None,
    description: DescriptionOpt = None,
    engine: EngineOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
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
    from cart.io import Console, check_outputs
    from cart.synth import parse_shard, synthesize

    console = Console(quiet)
    cfg = _resolve("synth", locals())
    shard_ix = parse_shard(shard)
    inputs = _inputs(inputs, "corpus files/directories or chunk JSONL")
    check_outputs({"-o": output}, [*inputs, cfg.seed_prompts])
    synthesize(inputs, cfg, model, output, shard_ix, console)


@app.command("distill", cls=_Stage)
def distill_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="cart.convo/1 JSONL files from cart synth, or - for stdin.", show_default=False)] = None,
    tokens: TokensOpt = None,
    init: Annotated[Optional[str], _opt(
        "--init", "Initial KV: attention-match (the corpus's KV cache compacted to p positions, as "
                  "cart compact does), corpus (the model's KV of the corpus's first p tokens), "
                  "random-tokens (KV of random token ids), random-vectors (Gaussian), text (KV of "
                  "--init-text), or a .safetensors cartridge (or PEFT adapter folder) to continue "
                  "training.")] = None,
    init_text: Annotated[Optional[str], _opt("--init-text", "The text file --init text "
                                                            "initialises from.")] = None,
    objective: Annotated[Optional[str], _opt(
        "--objective", "kl (distil the stored teacher top-k) or ntp (next-token prediction "
                       "ablation).")] = None,
    lr: Annotated[Optional[float], _opt("--lr", "Adam learning rate, constant. [default: 0.01 from a "
                                        "fitted start (attention-match, a cartridge file), else 0.05]")] = None,
    epochs: Annotated[Optional[int], _opt("--epochs", "Passes over the conversations.")] = None,
    steps: Annotated[Optional[int], _opt("--steps", "Optimizer steps (overrides --epochs; the "
                                                    "data repeats in fresh shuffles).")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "Packed rows per optimizer step, "
                                              "over all processes.")] = None,
    seq_len: Annotated[Optional[int], _opt("--seq-len", "Tokens per packed row (1 = no packing: "
                                           "one conversation per row).")] = None,
    grad_accum: Annotated[Optional[int], _opt("--grad-accum", "Micro-steps per optimizer step "
                                              "(same result, less memory).")] = None,
    seed: Annotated[Optional[int], _opt("--seed", "Shuffling and random inits.")] = None,
    dtype: Annotated[Optional[str], _opt("--dtype", "Compute: bfloat16 (autocast; the cartridge "
                                         "and Adam stay float32), float32, or auto (bfloat16 on "
                                         "GPUs and CPUs with native bfloat16, else float32).")] = None,
    device: DeviceOpt = None,
    save_every: Annotated[Optional[int], _opt("--save-every", "Checkpoint every N steps.")] = None,
    frozen_tokens: Annotated[Optional[int], _opt("--frozen-tokens", "Leading positions kept "
                                                 "frozen (the attention sink).")] = None,
    checkpoint: Annotated[Optional[str], _opt(
        "--checkpoint", "Checkpoint file (cartridge + Adam state); a rerun resumes from it. "
                        "[default: OUTPUT.ckpt with -o; none on stdout]")] = None,
    log: Annotated[Optional[str], _opt("--log", "Write one JSON line per step (loss, kl, "
                                                "tokens, tokens/s) to this file.")] = None,
    output: Annotated[Optional[str], _opt(
        ("-o", "--output"), "Cartridge file (.safetensors), written atomically, or - for stdout. "
                            "[default: stdout when it is not a terminal, else "
                            "cartridge-CORPUS-pP.safetensors]")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
):
    """Train a cartridge on self-study conversations by context distillation."""
    from cart.cartridge import read_metadata
    from cart.distill import distill, init_is_cartridge
    from cart.io import Console, check_outputs

    console = Console(quiet)
    if tokens is None and init is not None and init_is_cartridge(init) and Path(init).exists():
        tokens = read_metadata(init)["p"]  # continue training at the cartridge's own size
    cfg = _resolve("distill", locals())
    inputs = _inputs(inputs, "conversation JSONL files (cart synth)")
    if output is None and sys.stdout.isatty():
        output = "auto"  # never binary onto a terminal: a file named after the corpus
    # fail now, not after training
    check_outputs({"-o": None if output == "auto" else output, "--log": log,
                   "--checkpoint": checkpoint}, [*inputs, cfg.init, cfg.init_text])
    distill(inputs, cfg, model, output, checkpoint, log, console)


@app.command("compact", cls=_Stage)
def compact_command(
    inputs: Annotated[Optional[list[str]], typer.Argument(
        help="Corpus files or directories (text files), or - for stdin.", show_default=False)] = None,
    tokens: TokensOpt = None,
    window: Annotated[Optional[int], _opt("--window", "Corpus tokens per window; a longer corpus "
                                          "is compacted window by window and joined. [default: "
                                          "the most the model's context allows]")] = None,
    max_queries: Annotated[Optional[int], _opt("--max-queries", "Reference query vectors per KV "
                                               "head in each layer's fit.")] = None,
    budget: Annotated[Optional[str], _opt("--budget", "How keys are shared out: global (each "
                                          "layer and head keeps what attention needs, the same "
                                          "memory in all; a flat cartridge) or uniform (p per "
                                          "layer and head; the only kind vLLM serves). [default: "
                                          "global]")] = None,
    biases: Annotated[Optional[bool], _opt("--biases/--no-biases", "Fit a per-key attention "
                                           "bias too (the transformers engine applies it; vLLM "
                                           "refuses such cartridges). [default: with a global "
                                           "budget]")] = None,
    device: DeviceOpt = None,
    output: CartridgeOutOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
):
    """Compact the corpus's KV cache into a cartridge by attention matching (no training)."""
    from cart.compact import compact_corpus
    from cart.io import Console, check_outputs

    cfg = _resolve("compact", locals())
    inputs = _inputs(inputs, "corpus files or directories")
    _not_to_terminal(output)
    check_outputs({"-o": output}, inputs)
    compact_corpus(inputs, cfg, model, output, Console(quiet))


@app.command("eval", cls=_Stage)
def eval_command(
    questions: Annotated[str, typer.Argument(
        help="Question set: cart.questions/1 JSONL, or - for stdin.", show_default=False)],
    cartridge: Annotated[Optional[list[str]], _opt(
        ("--cartridge", "-c"), "A cartridge file or PEFT adapter folder to evaluate "
                               "(repeatable; each is one method).")] = None,
    icl: Annotated[Optional[list[str]], _opt(
        "--icl", "Corpus for in-context learning, read as cart chunk reads it: a file, a "
                 "directory (recursive, text files only) or - for stdin; the whole corpus goes "
                 "in the system message (repeatable: joined in order). Refused if it does not "
                 "fit the model's context.")] = None,
    truncate: Annotated[Optional[list[int]], _opt(
        "--truncate", "Also ICL on the corpus's first N tokens (the same-memory baseline; "
                      "repeatable; needs --icl).")] = None,
    no_context: Annotated[bool, typer.Option(
        "--no-context", help="Also answer with nothing before the question.")] = False,
    max_new_tokens: Annotated[Optional[int], _opt("--max-new-tokens", "Token cap of each answer.")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", "Questions generated together.")] = None,
    temperature: Annotated[Optional[float], _opt("--temperature", "Sampling temperature (0 = "
                                                                  "greedy).")] = None,
    seed: Annotated[Optional[int], _opt("--seed", "Sampling seed (with --temperature > 0).")] = None,
    stop_loops: StopLoopsOpt = None,
    engine: EngineOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    summary: Annotated[Optional[str], _opt("--summary", "Write the per-method summary (score, "
                                           "KV bytes, compression vs ICL, tokens/s) as JSON "
                                           "here.")] = None,
    plot: Annotated[Optional[str], _opt("--plot", "Write a PNG of quality against KV memory "
                                                  "(log scale) here.")] = None,
    table: Annotated[Optional[bool], _opt("--table/--no-table", "Print the side-by-side table "
                                          "on stderr. [default: when stderr is a terminal]")] = None,
    output: Annotated[Optional[str], typer.Option(
        "-o", "--output", help="Per-question results (cart.result/1 JSONL) to this file instead "
                               "of stdout; built as FILE.partial, and rerunning the same command "
                               "resumes it.", show_default="stdout")] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
):
    """Score cartridges against no context, ICL and truncated ICL on a question set."""
    from cart.eval import evaluate
    from cart.io import Console

    console = Console(quiet)
    cfg = _resolve("eval", locals())
    evaluate(questions, cfg, model, no_context=no_context, icl=icl or [], truncate=truncate or [],
             cartridges=cartridge or [], output=output, summary_path=summary, plot_path=plot,
             table=table, console=console)


@app.command("compose")
def compose_command(
    cartridges: Annotated[list[str], typer.Argument(
        help="Two or more cartridge files or PEFT adapter folders, in order (the first one's "
             "attention sink is kept); one of them may be - for stdin.", show_default=False)],
    output: CartridgeOutOpt = None,
    sinks: Annotated[str, typer.Option(
        "--sinks", help="one: keep only the first part's attention sink (later parts' sinks are "
                        "dropped); all: keep every part whole, its sink included.")] = "one",
    quiet: QuietOpt = False,
):
    """Concatenate cartridges into one (one attention sink, parts recorded)."""
    from cart.compose import compose_files
    from cart.io import Console, check_outputs

    _not_to_terminal(output)
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
    output: Annotated[Optional[str], _opt(
        ("-o", "--output"), "--to peft: the adapter folder, built beside it and renamed into "
                            "place. --to cart: the cartridge file, written atomically, or - for "
                            "stdout. [default: stdout when it is not a terminal]")] = None,
    model: Annotated[Optional[str], _opt(
        ("--model", "-m"), "The base model: the cartridge is checked against it, and an "
                           "adapter's base_model_name_or_path is taken from it (PEFT to cart: "
                           "when the adapter's own base model is not found locally). [default: "
                           "the model the input names]")] = None,
    quiet: QuietOpt = False,
):
    """Convert a cartridge to a Hugging Face PEFT CARTRIDGE adapter folder, or back."""
    from cart.convert import convert
    from cart.io import Console

    if to == "cart" or (to is None and source != "-" and Path(source).is_dir()):
        _not_to_terminal(output)
    convert(source, output, to, model, Console(quiet))


@app.command("info")
def info_command(
    cartridge: Annotated[str, typer.Argument(help="A cartridge file (.safetensors), a PEFT "
                                                  "adapter folder, or - for stdin.",
                                             show_default=False)],
    model: Annotated[Optional[str], _opt(("--model", "-m"), "Also check that the cartridge "
                                         "fits this model (refused if not).")] = None,
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


@app.command("serve", cls=_Stage)
def serve_command(
    cartridges: Annotated[Optional[str], _opt("--cartridges", "Directory of cartridges "
                                              "(.safetensors, or PEFT adapter folders); a request "
                                              "names one by its file name without the extension "
                                              "(or its folder name). Files added or replaced "
                                              "later are picked up without a restart.")] = None,
    model: ModelOpt = None,
    host: Annotated[Optional[str], _opt("--host", "Address to listen on; 0.0.0.0 opens the "
                                                  "server to the network.")] = None,
    port: Annotated[Optional[int], _opt("--port", "TCP port (0: any free one, shown on "
                                                  "stderr).")] = None,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="CART_API_KEY", show_envvar=True, show_default=False,
        help="Require 'Authorization: Bearer KEY' on /v1/... (prefer the environment variable: "
             "a flag shows in the process list).")] = None,
    max_tokens: Annotated[Optional[int], _opt("--max-tokens", "Cap on a request's max_tokens, "
                                              "and the default when a chat request gives none.")] = None,
    max_prompt_tokens: Annotated[Optional[int], _opt("--max-prompt-tokens", "Longest prompt "
                                                     "accepted, in tokens (0: the model's "
                                                     "context).")] = None,
    max_body_bytes: Annotated[Optional[str], _opt("--max-body-bytes", "Largest request body "
                                                  "(e.g. 1MiB); larger is refused with 413.")] = None,
    max_concurrent: Annotated[Optional[int], _opt("--max-concurrent", "Requests in flight "
                                                  "(decoding + waiting); more are refused with "
                                                  "429.")] = None,
    max_batch: Annotated[Optional[int], _opt("--max-batch", "Requests decoded together in one "
                                             "step; the rest wait their turn.")] = None,
    cache_bytes: Annotated[Optional[str], _opt("--cache-bytes", "Memory for loaded cartridges "
                                               "(least recently used are dropped first), e.g. "
                                               "4GiB.")] = None,
    shutdown_timeout: Annotated[Optional[float], _opt("--shutdown-timeout", "Seconds in-flight "
                                                      "requests get to finish after SIGTERM or "
                                                      "Ctrl-C.")] = None,
    request_timeout: Annotated[Optional[float], _opt("--request-timeout", "Seconds a client "
                                                     "gets to send a request's headers, and "
                                                     "then its body; slower connections are "
                                                     "closed.")] = None,
    engine: EngineOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors on "
                                                              "stderr (no request log).")] = False,
):
    """Serve cartridges over an OpenAI-compatible HTTP API (chat, completions, models)."""
    from cart.io import Console
    from cart.serve import serve

    if api_key is None and os.environ.get("CART_API_KEY") == "":
        api_key = ""  # click takes an empty variable for unset: refuse it as --api-key ""
    serve(_resolve("serve", locals()), model, quiet=quiet, console=Console(quiet))


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
