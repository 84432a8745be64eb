"""Print a table of a cart.chunk/1 JSONL file (used by `make demo`)."""

import sys

from rich.console import Console
from rich.table import Table

from cart.io import read_jsonl


def main(path: str) -> None:
    lines = list(read_jsonl(path, kind="chunk"))
    first = lines[0].record
    corpus = first["corpus"]
    table = Table(title=f"{len(lines)} chunks of {path}  (corpus {corpus['hash']}: "
                        f"{corpus['n_tokens']} tokens, {corpus['n_documents']} document(s); "
                        f"tokenizer {first['tokenizer']['model']})")
    for col in ("id", "tokens", "window", "source", "text"):
        table.add_column(col, overflow="fold" if col == "text" else "ellipsis")
    covered = set()
    for line in lines:
        r = line.record
        covered.update(range(r["start"], r["end"]))
        src = ", ".join(f"{s['path']}[{s['start']}:{s['end']}]" for s in r["sources"])
        text = " ".join(r["text"].split())
        table.add_row(r["id"], str(r["n_tokens"]), f"{r['start']}-{r['end']}", src,
                      text[:70] + ("..." if len(text) > 70 else ""))
    console = Console(width=160)
    console.print(table)
    console.print(f"coverage: {len(covered) / corpus['n_tokens']:.0%} of corpus tokens are in "
                  f"at least one chunk; config: {first['config']}")


if __name__ == "__main__":
    main(sys.argv[1])
