"""``cart eval --plot``: quality against KV memory, like the paper's Figure 3.

One point per method (x: KV cache bytes, log scale). ICL is a dashed horizontal line (and its
point), no context -- which holds no KV, so has no place on a log axis -- a dotted one; the
truncated-ICL points are joined into a curve. Two panels: the score of the generated answers
(when the question set has generating metrics) and the reference answers' log-likelihood per
token (higher is better).
"""

from __future__ import annotations

from typing import Any

from cart.io import atomic_write_bytes

_COLORS = {"icl": "#444444", "truncated_icl": "#1f77b4", "cartridge": "#d62728",
           "no_context": "#888888"}
_CARTRIDGE_COLORS = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def plot_summary(report: dict[str, Any], path: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    panels = []
    if any(m["score"] is not None for m in methods):
        panels.append(("score", "score (generated answers)", lambda m: m["score"]))
    panels.append(("loglik", "reference answer log-likelihood / token",
                   lambda m: -m["answer_nll"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    xs = [m["kv_bytes"] for m in methods if m["kv_bytes"] > 0]
    for ax, (_, label, value) in zip(axes[0], panels):
        for m in methods:
            y = value(m)
            if y is None:
                continue
            if m["kind"] == "icl":
                ax.axhline(y, color=_COLORS["icl"], linestyle="--", linewidth=1.2,
                           label=f"ICL ({m['kv_tokens']} tokens)")
            elif m["kind"] == "no_context":
                ax.axhline(y, color=_COLORS["no_context"], linestyle=":", linewidth=1.2,
                           label="no context")
        trunc = sorted((m for m in methods if m["kind"] == "truncated_icl" and value(m) is not None),
                       key=lambda m: m["kv_bytes"])
        if trunc:
            ax.plot([m["kv_bytes"] for m in trunc], [value(m) for m in trunc], "o-",
                    color=_COLORS["truncated_icl"], label="ICL, first N tokens")
        carts = [m for m in methods if m["kind"] == "cartridge"]
        for m in methods:
            y = value(m)
            if y is None or m["kind"] not in ("icl", "cartridge"):
                continue
            if m["kind"] == "icl":
                ax.scatter([m["kv_bytes"]], [y], marker="s", s=60, color=_COLORS["icl"], zorder=3)
            else:  # one colour per cartridge, so several are told apart
                color = _CARTRIDGE_COLORS[carts.index(m) % len(_CARTRIDGE_COLORS)]
                ax.scatter([m["kv_bytes"]], [y], marker="*", s=140, color=color, zorder=3,
                           label=m["method"])
        for m in methods:
            y = value(m)
            if y is not None and m["kv_bytes"] > 0:
                ax.annotate(m["method"], (m["kv_bytes"], y), textcoords="offset points",
                            xytext=(5, 5), fontsize=7)
        ax.set_xscale("log")
        if xs:
            ax.set_xlim(min(xs) / 2, max(xs) * 2)
        ax.set_xlabel("KV cache memory (bytes, log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{report['questions']}: {report['num_questions']} questions, "
                 f"{report['model']['id']}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
