"""Before/after equality of rendered reports: the same figures on every page and the same plotted data.

    python benchmarks/compare_reports.py OLD_REPORT NEW_REPORT

Compares the run page and every arm page of two report folders (or two search-report folders): the
figures in page order (id, title, caption, the section heading above each), and every figure's CSV
(bitwise equal text). PNGs are not compared (font hinting and matplotlib versions move pixels). Exit 1
on any difference, listing each.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_FIGURE = re.compile(r'<figure(?: id="([^"]*)")?>\s*<h[23]>(.*?)</h[23]>.*?<figcaption>(.*?)</figcaption>', re.S)
_SECTION = re.compile(r"<h2[^>]*>(.*?)</h2>", re.S)


def figures(html: str) -> list[tuple[str, str, str, str]]:
    """``(section, id, title, caption)`` of every figure of a page, in page order."""
    out = []
    for m in _FIGURE.finditer(html):
        sections = _SECTION.findall(html[:m.start()])
        out.append((sections[-1].strip() if sections else "", m.group(1) or "", m.group(2).strip(),
                    re.sub(r"\s+", " ", m.group(3)).strip()))
    return out


def compare(old: Path, new: Path) -> list[str]:
    """Every difference between the report folders ``old`` and ``new``."""
    problems = []
    pages = sorted(p.relative_to(old) for p in old.rglob("index.html"))
    if pages != sorted(p.relative_to(new) for p in new.rglob("index.html")):
        problems.append(f"different pages: {pages} vs {sorted(p.relative_to(new) for p in new.rglob('index.html'))}")
    for page in pages:
        if not (new / page).exists():
            continue
        a, b = figures((old / page).read_text()), figures((new / page).read_text())
        if a != b:
            problems.append(f"{page}: figures differ:\n  old {a}\n  new {b}")
    csvs = sorted(p.relative_to(old) for p in old.rglob("*.csv"))
    new_csvs = sorted(p.relative_to(new) for p in new.rglob("*.csv"))
    if csvs != new_csvs:
        problems.append(f"CSV files differ: only old {sorted(set(csvs) - set(new_csvs))}, "
                        f"only new {sorted(set(new_csvs) - set(csvs))}")
    problems += [f"{c}: content differs" for c in csvs
                 if (new / c).exists() and (old / c).read_bytes() != (new / c).read_bytes()]
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    args = ap.parse_args(argv)
    problems = compare(args.old, args.new)
    n_pages = len(list(args.old.rglob("index.html")))
    n_figs = sum(len(figures(p.read_text())) for p in args.old.rglob("index.html"))
    n_csv = len(list(args.old.rglob("*.csv")))
    for p in problems:
        print(p)
    print(f"{'DIFFERENT' if problems else 'same'}: {n_pages} pages, {n_figs} figures, {n_csv} CSV files")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
