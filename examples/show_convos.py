"""Print a summary of a cart.convo/1 JSONL file (used by `make demo`)."""

import sys

from rich.console import Console
from rich.table import Table

from cart.io import read_jsonl


def main(path: str) -> None:
    lines = [line.record for line in read_jsonl(path, kind="convo")]
    table = Table(title=f"{len(lines)} self-study conversations in {path}")
    for col in ("#", "seed type", "A asks (user)", "B answers (assistant)", "targets"):
        table.add_column(col, overflow="fold")
    for r in lines:
        ask = " ".join(r["messages"][0]["content"].split())
        answer = " ".join(r["messages"][1]["content"].split())
        table.add_row(str(r["index"]), r["seed_prompt"]["type"], ask[:90], answer[:90],
                      str(len(r["targets"]["positions"])))
    console = Console(width=170)
    console.print(table)
    n_targets = sum(len(r["targets"]["positions"]) for r in lines)
    n_cands = sum(len(c) for r in lines for c in r["targets"]["ids"])
    console.print(f"{n_targets} teacher-target positions, {n_cands / max(n_targets, 1):.1f} "
                  f"candidates kept per position on average (top-20 up to 0.99 probability)")


if __name__ == "__main__":
    main(sys.argv[1])
