"""``cart eval``: answer a question set with several methods side by side -- no context, the
corpus in context (ICL), ICL on the corpus's first N tokens (the same-memory baseline), and
cartridges -- and score them (paper sections 5.1 and 5.4).

Prompts are the ones a cartridge was trained for: ``cart synth``'s student sequence is the
conversation under the model's chat template *without* a system message (the template's own
default system prompt, if any, stays), so a cartridge is queried the same way, its tokens at
positions p, p+1, ... ICL puts the corpus in the system message exactly as the teacher saw a
chunk. Every question gets the teacher-forced log-likelihood of its reference answer (mean NLL
per token, perplexity); questions whose metric generates are also answered greedily (batched,
through the engine) and scored by their metric.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cart.config import MAX_BATCH, check_at_most, check_type
from cart.engines.base import Engine, GenerationRequest, KVPrefix, ScoreRequest
from cart.io import (CartError, Console, PartialOutput, atomic_output, check_outputs,
                     check_stdin_once, display_name, dumps, human_bytes, output_destination,
                     run_fingerprint, sha256_hex)

RESULT_SCHEMA = "cart.result/1"


@dataclass
class EvalConfig:
    max_new_tokens: int = 64
    batch_size: int = 16
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0
    stop_loops: bool = True
    engine: str = "auto"
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        from cart.engines import check_runtime

        for name in ("max_new_tokens", "batch_size", "seed"):
            check_type(name, getattr(self, name), int)
        check_type("temperature", self.temperature, (int, float))
        check_type("stop_loops", self.stop_loops, bool)
        if self.max_new_tokens < 1:
            raise CartError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise CartError(f"--batch-size must be >= 1, got {self.batch_size}")
        check_at_most("--batch-size", self.batch_size, MAX_BATCH)
        if self.temperature < 0:
            raise CartError(f"--temperature must be >= 0, got {self.temperature}")
        check_runtime(self.engine, self.dtype)


@dataclass
class Method:
    """One way of answering: what precedes every question."""

    name: str
    kind: str  # no_context | icl | truncated_icl | cartridge
    kv_tokens: int  # KV positions it holds before the question (a flat cartridge's: per head, average)
    source: str | None = None  # cartridge file or corpus files
    system: str | None = None  # ICL: the system message holding the corpus
    kv_prefix: KVPrefix | None = None  # cartridge
    digest: str = ""  # content hash (resume fingerprint)
    info: dict[str, Any] = field(default_factory=dict)
    # a cartridge's stored K/V entries: its memory is these in the eval dtype, exactly (a flat
    # cartridge's kv_tokens is an average); None: kv_tokens x the bytes per token
    kv_elements: int | None = None


# -- building the methods ----------------------------------------------------------------------
def build_methods(engine: Engine, *, no_context: bool, icl: Sequence[str], truncate: Sequence[int],
                  cartridges: Sequence[str], console: Console | None = None) -> list[Method]:
    from cart.chat import SYSTEM_TEMPLATE, shared_prefix_len

    tok = engine.tokenizer
    methods: list[Method] = []
    if no_context:
        methods.append(Method("no context", "no_context", 0))
    if truncate and not icl:
        raise CartError("--truncate N needs the corpus: give --icl CORPUS")
    if icl:
        from cart.chunk import corpus_text, read_corpus

        corpus = corpus_text(read_corpus(icl, console or Console(quiet=True)))
        corpus_ids = tok(corpus, add_special_tokens=False)["input_ids"]
        source = ", ".join(icl)
        system = SYSTEM_TEMPLATE.format(chunk=corpus)
        methods.append(Method("ICL", "icl", shared_prefix_len(tok, system), source, system,
                              digest=sha256_hex(corpus), info={"corpus_tokens": len(corpus_ids)}))
        for n in sorted(set(truncate)):
            if n < 1:
                raise CartError(f"--truncate must be >= 1, got {n}")
            if n >= len(corpus_ids):
                raise CartError(f"--truncate {n}: the corpus ({source}) has only {len(corpus_ids)} "
                                f"tokens")
            text = tok.decode(corpus_ids[:n])
            system = SYSTEM_TEMPLATE.format(chunk=text)
            methods.append(Method(f"ICL first {n}", "truncated_icl", shared_prefix_len(tok, system),
                                  source, system, digest=sha256_hex(text),
                                  info={"corpus_tokens": n}))
    names = [_cartridge_name(p, cartridges) for p in cartridges]
    for path, name in zip(cartridges, names):
        from cart.cartridge import Cartridge

        cart = Cartridge.load(path, engine.identity)
        methods.append(Method(name, "cartridge", cart.num_tokens, path,
                              kv_prefix=KVPrefix.of_cartridge(cart, cart.file_sha256),
                              digest=cart.file_sha256, kv_elements=cart.kv_elements,
                              info={"p": cart.num_tokens, "corpus_tokens": cart.metadata.get("corpus_tokens"),
                                    "parts": len(cart.metadata.get("parts") or []) or None}))
    if not methods:
        raise CartError("nothing to evaluate: give --cartridge FILE, --icl CORPUS or --no-context")
    return methods


def _cartridge_name(path: str, all_paths: Sequence[str]) -> str:
    """The file's stem (an adapter folder's name), or its path when two cartridges share a
    stem."""
    stem = Path(path).name.removesuffix(".safetensors")
    same = [p for p in all_paths if Path(p).name.removesuffix(".safetensors") == stem]
    return stem if len(same) == 1 else str(path)


# -- prompts -----------------------------------------------------------------------------------
def method_messages(method: Method, q: dict[str, Any]) -> list[dict[str, Any]]:
    from cart.questions import question_messages

    msgs = question_messages(q)
    if method.system is None:
        return msgs
    if msgs[0]["role"] == "system":  # the question's own system text follows the corpus
        return [{"role": "system", "content": f"{method.system}\n\n{msgs[0]['content']}"}, *msgs[1:]]
    return [{"role": "system", "content": method.system}, *msgs]


class Prompts:
    """Token ids of each (method, question): the generation prompt and the scoring sequence
    (prompt + reference answer), with the shared prefix of ICL's system turn marked. Each is
    rendered once (the fit check and the run both use them; ICL's render the whole corpus)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._shared: dict[str, list[int]] = {}
        self._memo: dict[tuple[str, str, str], Any] = {}

    def _once(self, kind: str, method: Method, q: dict[str, Any], build):
        key = (kind, method.name, q["id"])
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def _prefix_len(self, method: Method, ids: list[int]) -> int:
        if method.system is None:
            return 0
        from cart.chat import render_ids

        shared = self._shared.get(method.name)
        if shared is None:
            shared = render_ids(self.tok, [{"role": "system", "content": method.system},
                                           {"role": "user", "content": "a"}], True)[0][:method.kv_tokens]
            self._shared[method.name] = shared
        n = 0
        while n < min(len(shared), len(ids)) and shared[n] == ids[n]:
            n += 1
        return n

    def generation(self, method: Method, q: dict[str, Any]) -> tuple[list[int], int]:
        return self._once("generation", method, q, lambda: self._generation(method, q))

    def scoring(self, method: Method, q: dict[str, Any]) -> tuple[list[int], int, int]:
        """(ids ending with the reference answer, index of its first token, prefix length)."""
        return self._once("scoring", method, q, lambda: self._scoring(method, q))

    def _render(self, method: Method, messages, add_generation_prompt: bool):
        """After a cartridge, messages follow it as they follow the document in ICL."""
        from cart.chat import render_cartridge_ids, render_ids

        render = render_cartridge_ids if method.kind == "cartridge" else render_ids
        return render(self.tok, messages, add_generation_prompt)

    def _generation(self, method: Method, q: dict[str, Any]) -> tuple[list[int], int]:
        ids, _ = self._render(method, method_messages(method, q), True)
        return ids, self._prefix_len(method, ids)

    def _scoring(self, method: Method, q: dict[str, Any]) -> tuple[list[int], int, int]:
        from cart.questions import reference_answer

        answer = self.tok(reference_answer(q), add_special_tokens=False)["input_ids"]
        msgs = [*method_messages(method, q), {"role": "assistant", "content": answer}]
        ids, spans = self._render(method, msgs, False)
        start, end = spans[-1]
        return ids[:end], start, self._prefix_len(method, ids)


def check_fits(engine: Engine, methods: list[Method], questions: list[dict[str, Any]], prompts: Prompts,
               cfg: EvalConfig, questions_path: str) -> None:
    """Refuse up front, clearly, a question or a method whose context does not fit the model."""
    for m in methods:
        longest, worst = 0, None
        for q in questions:
            ids, start, _ = prompts.scoring(m, q)
            gen = prompts.generation(m, q)[0]
            own = max(len(ids), len(gen) + cfg.max_new_tokens)
            # with nothing but the question in the prompt (ICL's holds the corpus), a prompt
            # that does not fit is the question's fault, whatever comes before it
            if own > engine.max_context and m.kind in ("no_context", "cartridge"):
                raise CartError(f"{display_name(questions_path)}: question {q['id']} needs {own} tokens of "
                                f"context (question and {cfg.max_new_tokens} new tokens), more "
                                f"than the model's {engine.max_context}")
            if own > longest:
                longest, worst = own, q["id"]
        # positions run to the query position (compacted keys keep the corpus's) + the prompt
        need = longest + (max(m.kv_prefix.num_tokens, m.kv_prefix.query_position) if m.kv_prefix else 0)
        if need > engine.max_context:
            hint = ("; use --truncate N for the corpus's first N tokens" if m.kind == "icl"
                    else "")
            raise CartError(f"{m.source or m.name}: {m.name} needs {need} tokens of context "
                            f"({m.kv_tokens} before the question, question {worst} and "
                            f"{cfg.max_new_tokens} new tokens), more than the model's "
                            f"{engine.max_context}{hint}")


# -- running -----------------------------------------------------------------------------------
def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_batch(engine: Engine, method: Method, batch: list[dict[str, Any]], b_index: int,
              prompts: Prompts, cfg: EvalConfig, metrics: dict[str, Any]):
    """One batch of questions with one method: ``(rows, stats)``, the per-question results and
    the batch's generated tokens and seconds."""
    started = time.perf_counter()
    gen_q = [q for q in batch if metrics[q["metric"]].generates]
    requests = []
    for i, q in enumerate(gen_q):
        ids, prefix_len = prompts.generation(method, q)
        requests.append(GenerationRequest(ids, cfg.max_new_tokens, cfg.temperature,
                                          prefix_len=prefix_len, stop_loops=cfg.stop_loops,
                                          seed=cfg.seed * 1_000_003 + b_index * cfg.batch_size + i,
                                          kv_prefix=method.kv_prefix))
    outputs = engine.generate(requests, cfg.seed) if requests else []
    gen_seconds = time.perf_counter() - started
    by_id = dict(zip((q["id"] for q in gen_q), outputs))
    score_requests = []
    for q in batch:
        ids, start, prefix_len = prompts.scoring(method, q)
        score_requests.append(ScoreRequest(ids, start, prefix_len, method.kv_prefix))
    logprobs = engine.score(score_requests)
    rows, gen_tokens = [], 0
    for q, lps in zip(batch, logprobs):
        nll = -sum(lps) / len(lps)
        row = {"schema": RESULT_SCHEMA, "id": q["id"], "method": method.name,
               "metric": q["metric"], "prediction": None, "score": None,
               "answer_nll": round(nll, 6), "answer_tokens": len(lps)}
        out = by_id.get(q["id"])
        if out is not None:
            ids = [t for t in out.token_ids if t not in engine.eos_token_ids]
            text = engine.tokenizer.decode(ids, skip_special_tokens=True).strip()
            gen_tokens += len(out.token_ids)
            row.update(prediction=text, score=metrics[q["metric"]].score(text, q),
                       generated_tokens=len(out.token_ids), finished=out.finished)
        rows.append(row)
    return rows, {"generated_tokens": gen_tokens, "generation_seconds": gen_seconds,
                 "seconds": time.perf_counter() - started}


def summarize(method: Method, rows: list[dict[str, Any]], stats: list[dict[str, float]],
              bytes_per_token: int, icl_tokens: int | None, element_bytes: int) -> dict[str, Any]:
    """``element_bytes``: the size of one K or V entry in the eval dtype."""
    scored = [r for r in rows if r["score"] is not None]
    by_metric: dict[str, list[float]] = {}
    for r in scored:
        by_metric.setdefault(r["metric"], []).append(r["score"])
    n_tok = sum(r["answer_tokens"] for r in rows)
    nll = sum(r["answer_nll"] * r["answer_tokens"] for r in rows) / n_tok
    gen_tokens = sum(s["generated_tokens"] for s in stats)
    gen_seconds = sum(s["generation_seconds"] for s in stats)
    kv_bytes = (method.kv_tokens * bytes_per_token if method.kv_elements is None
                else method.kv_elements * element_bytes)
    return {
        "method": method.name, "kind": method.kind, "source": method.source,
        "kv_tokens": method.kv_tokens, "kv_bytes": kv_bytes,
        # from the bytes: a flat cartridge's kv_tokens is an average
        "compression_vs_icl": (round(icl_tokens * bytes_per_token / kv_bytes, 2)
                               if icl_tokens and kv_bytes else None),
        "questions": len(rows), "scored": len(scored),
        "score": (sum(r["score"] for r in scored) / len(scored)) if scored else None,
        "correct": sum(r["score"] for r in scored),
        "by_metric": {k: sum(v) / len(v) for k, v in sorted(by_metric.items())},
        "answer_nll": nll, "answer_perplexity": math.exp(nll), "answer_tokens": n_tok,
        "generated_tokens": gen_tokens,
        "tokens_per_s": round(gen_tokens / gen_seconds, 2) if gen_seconds > 0 and gen_tokens else None,
        "seconds": round(sum(s["seconds"] for s in stats), 2),
        **{k: v for k, v in method.info.items() if v is not None},
    }


# -- resuming ----------------------------------------------------------------------------------
def done_batches(earlier: list[tuple[dict, int]]) -> tuple[dict[tuple[str, int], dict[str, Any]], int]:
    """The batches a partial file holds (``PartialOutput.earlier``) as ``(method, batch) ->
    record``, and the byte offset past them."""
    done: dict[tuple[str, int], dict[str, Any]] = {}
    end = 0
    for rec, rec_end in earlier:
        if not {"method", "batch", "stats", "rows"} <= rec.keys():
            break  # not a batch this program wrote: redone from here
        done[(rec["method"], rec["batch"])], end = rec, rec_end
    return done, end


# -- the job -----------------------------------------------------------------------------------
def evaluate(questions_path: str, cfg: EvalConfig, model: str | None, *, no_context: bool,
             icl: Sequence[str], truncate: Sequence[int], cartridges: Sequence[str],
             output: str | None, summary_path: str | None, plot_path: str | None,
             table: bool | None, console: Console) -> list[dict[str, Any]]:
    """The whole ``cart eval`` job. Returns the per-method summaries."""
    from cart.cartridge import dtype_bytes, kv_bytes_per_token
    from cart.engines import get_engine, with_runtime
    from cart.io import open_input_bytes
    from cart.metrics import METRICS
    from cart.models import resolve_device
    from cart.questions import load_questions

    from cart.cartridge import has_biases

    check_stdin_once([questions_path, *icl, *cartridges])
    cfg = with_runtime(cfg, biases=any(has_biases(c) for c in cartridges))
    check_outputs({"-o": output, "--summary": summary_path, "--plot": plot_path},
                  [questions_path, *cartridges, *icl])
    if plot_path is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise CartError("--plot needs matplotlib: pip install matplotlib")
    with open_input_bytes(questions_path) as f:
        questions_bytes = f.read()
    questions = load_questions(questions_path, questions_bytes)
    metrics = {name: METRICS[name]() for name in {q["metric"] for q in questions}}
    engine = get_engine(cfg.engine, model, dtype=cfg.dtype, device=resolve_device(cfg.device),
                        console=console)
    methods = build_methods(engine, no_context=no_context, icl=icl, truncate=truncate,
                            cartridges=cartridges, console=console)
    prompts = Prompts(engine.tokenizer)
    check_fits(engine, methods, questions, prompts, cfg, questions_path)
    ident = engine.identity
    bytes_per_token = kv_bytes_per_token(ident.num_layers, ident.kv_heads, ident.head_dim, cfg.dtype)
    element_bytes = dtype_bytes(cfg.dtype)
    icl_tokens = next((m.kv_tokens for m in methods if m.kind == "icl"), None)

    run = run_fingerprint(asdict(cfg), ident.model_id, ident.config_hash, sha256_hex(questions_bytes),
                          [[m.name, m.kind, m.digest] for m in methods])
    done, partial = resume_output(output, run, console)
    summaries, all_rows = [], []
    with atomic_output(output) if partial is None else contextlib.nullcontext() as live, \
            console.progress() as progress:
        task = progress.add_task("eval", total=len(methods) * len(questions), status="")
        for m in methods:
            rows, stats = [], []
            for b, batch in enumerate(_batches(questions, cfg.batch_size)):
                rec = done.get((m.name, b))
                if rec is None:
                    batch_rows, batch_stats = run_batch(engine, m, batch, b, prompts, cfg, metrics)
                    rec = {"method": m.name, "batch": b, "stats": batch_stats, "rows": batch_rows}
                    if partial is not None:
                        partial.append([rec])
                if live is not None:
                    live.write(b"".join(dumps(r) for r in rec["rows"]))
                    live.flush()
                rows.extend(rec["rows"])
                stats.append(rec["stats"])
                progress.update(task, advance=len(rec["rows"]), status=m.name)
            summaries.append(summarize(m, rows, stats, bytes_per_token, icl_tokens, element_bytes))
            all_rows.extend(rows)
    add_gap_closed(summaries)
    if partial is not None:
        partial.finish(all_rows)
    report = {"schema": "cart.eval-summary/1", "questions": display_name(questions_path),
              "num_questions": len(questions),
              "model": {"id": ident.model_id, "config_hash": ident.config_hash},
              "config": asdict(cfg), "kv_bytes_per_token": bytes_per_token, "methods": summaries}
    write_report(report, summary_path, plot_path, console)
    if table or (table is None and console.interactive):
        print(format_table(summaries), file=sys.stderr, end="", flush=True)
    return summaries


def resume_output(output: str | None, run: str, console: Console
                  ) -> tuple[dict[tuple[str, int], dict[str, Any]], PartialOutput | None]:
    """The batches an earlier run of the same ``run`` fingerprint finished, by (method, batch),
    and the ``FILE.partial`` this run goes on writing: a file output is built as FILE.partial,
    which a rerun resumes; stdout, or a pipe or device (-o >(...)), takes the rows as they come
    (nothing to resume, None)."""
    if output in (None, "-") or not output_destination(output)[1]:
        return {}, None
    partial = PartialOutput(output, run, "partial results of another run (other questions, "
                            "methods or settings)")
    done, end = done_batches(partial.earlier)
    if done:
        console.info(f"resuming {partial.path}: {len(done)} batches already done")
    partial.resume(end)
    return done, partial


def write_report(report: dict[str, Any], summary_path: str | None, plot_path: str | None,
                 console: Console) -> None:
    """The ``cart.eval-summary/1`` report to ``--summary`` (JSON) and as ``--plot``, where asked."""
    if summary_path is not None:
        import json

        from cart.io import atomic_write_bytes

        atomic_write_bytes(summary_path, (json.dumps(report, indent=1) + "\n").encode())
    if plot_path is not None:
        from cart.plot import plot_summary

        plot_summary(report, plot_path)
        console.info(f"plot written to {plot_path}")


def add_gap_closed(summaries: list[dict[str, Any]]) -> None:
    """Each method's ``nll_gap_closed``: the fraction of the no-context -> ICL answer-NLL gap it
    closes (0 = no context, 1 = ICL), when the run has both (the first ICL method) and ICL is
    better; else None."""
    first = {}
    for s in summaries:
        first.setdefault(s["kind"], s["answer_nll"])
    none, icl = first.get("no_context"), first.get("icl")
    for s in summaries:
        s["nll_gap_closed"] = (round((none - s["answer_nll"]) / (none - icl), 4)
                               if none is not None and icl is not None and none > icl else None)


def format_table(summaries: list[dict[str, Any]]) -> str:
    """The side-by-side table (plain text, fixed columns)."""
    head = (f"{'method':24} {'KV tokens':>9} {'KV memory':>10} {'vs ICL':>7} {'score':>13} "
            f"{'NLL/token':>9} {'gap':>5} {'ppl':>7} {'tok/s':>6}")
    lines = [head, "-" * len(head)]
    for s in summaries:
        ratio = f"{s['compression_vs_icl']:g}x" if s["compression_vs_icl"] else "-"
        score = (f"{s['score']:.3f} ({_num(s['correct'])}/{s['scored']})" if s["score"] is not None
                 else "-")
        tps = f"{s['tokens_per_s']:.0f}" if s["tokens_per_s"] else "-"
        gap = f"{100 * s['nll_gap_closed']:.0f}%" if s.get("nll_gap_closed") is not None else "-"
        lines.append(f"{s['method'][:24]:24} {s['kv_tokens']:9d} {human_bytes(s['kv_bytes']):>10} "
                     f"{ratio:>7} {score:>13} {s['answer_nll']:9.3f} {gap:>5} "
                     f"{s['answer_perplexity']:7.1f} {tps:>6}")
    gaps = any(s.get("nll_gap_closed") is not None for s in summaries)
    return ("\n".join(lines) + "\n"
            + ("gap: the fraction of the no-context -> ICL answer-NLL gap closed\n" if gaps else ""))


def _num(x: float) -> str:
    return f"{x:g}" if x != int(x) else str(int(x))
