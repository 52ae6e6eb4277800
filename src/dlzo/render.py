"""The tables stage's three text formats: Markdown (the README's), LaTeX (booktabs, the paper's) and HTML
(the report's). A ``Table`` is a title, a header, rows of strings and a note; nothing here computes."""
from __future__ import annotations

import html
from dataclasses import dataclass


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def _esc_tex(s: str) -> str:
    s = str(s).replace("\\", "\0")
    for a in "&%$#_{}":
        s = s.replace(a, "\\" + a)
    s = s.replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}").replace("\0", r"\textbackslash{}")
    return s.replace("±", r"$\pm$").replace("×", r"$\times$").replace("—", "--")


def to_markdown(tables: list[Table], note: str = "") -> str:
    parts = []
    for t in tables:
        cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731 - a bare | would split the cell
        lines = [f"### {t.title}", "", "| " + " | ".join(map(cell, t.header)) + " |", "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(map(cell, r)) + " |" for r in t.rows]
        parts.append("\n".join(lines) + (f"\n\n{t.note}" if t.note else ""))
    return "\n\n".join(parts + ([note] if note else [])) + "\n"


def to_latex(tables: list[Table], note: str = "") -> str:
    """booktabs tables (\\usepackage{booktabs}); one table environment per model or task."""
    parts = ["\n".join(f"% {line}" for line in note.splitlines() if line.strip())] if note else []
    for t in tables:
        cols = "l" + "r" * (len(t.header) - 1)
        body = [" & ".join(_esc_tex(c) for c in r) + r" \\" for r in t.rows]
        parts.append("\n".join([r"\begin{table}[t]", r"\centering", r"\small",
                                rf"\caption{{{_esc_tex(t.title)}}}", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
                                " & ".join(_esc_tex(h) for h in t.header) + r" \\", r"\midrule", *body,
                                r"\bottomrule", r"\end{tabular}", r"\end{table}"]))
    return "\n\n".join(parts) + "\n"


def to_html(tables: list[Table], title: str, note: str = "") -> str:
    css = ("body{font-family:sans-serif;font-size:14px;margin:1em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
           "th,td{border-bottom:1px solid #bbb;padding:3px 9px;text-align:right}th{border-bottom:2px solid #000}"
           "td:first-child,th:first-child{text-align:left}p.note{max-width:60em;color:#333}")
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{css}</style></head><body>"]
    for t in tables:
        out.append(f"<h3>{html.escape(t.title)}</h3><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
                   + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t.rows)
                   + "</table>" + (f"<p class='note'>{html.escape(t.note)}</p>" if t.note else ""))
    if note:
        out += [f"<p class='note'>{html.escape(p)}</p>" for p in note.split("\n\n")]
    return "\n".join(out) + "</body></html>\n"
