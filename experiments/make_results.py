"""Regenerate every ablation's results and figures, and the results section of experiments/README.md.

    python experiments/make_results.py                 # all seven at their default size (~6 min on 2 cores)
    python experiments/make_results.py --only theta    # one (the others' sections stay as they are)
    python experiments/make_results.py --executor ray  # any flag after the known ones goes to every script

Each script writes experiments/results/NAME/ (results.jsonl, results.csv, table.md, figures); the
README section between the `ablations` markers is rebuilt from those folders: how to reproduce,
the table, the figures. wall_s.json and the README are written whole or not at all (moepic.outputs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
BEGIN, END = "<!-- ablations:begin -->", "<!-- ablations:end -->"
# (issue letter, script name) in the order the README shows them.
SCRIPTS = (("a", "policies"), ("b", "theta"), ("c", "predictors"), ("d", "configurator"), ("e", "hardware"), ("f", "batch"), ("g", "learned_policy"))


def load(name: str):
    path = HERE / f"ablate_{name}.py"
    spec = importlib.util.spec_from_file_location(f"ablate_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section(letter: str, name: str, wall_s: float | None) -> str:
    module = load(name)
    folder = RESULTS / name
    doc = (module.__doc__ or "").strip().split("\n\n")
    title = doc[0].split(": ", 1)[-1]
    lines = [f"### ({letter}) {title[:1].upper()}{title[1:]}", "", *doc[1:2], "",
             f"Reproduce: `python experiments/ablate_{name}.py`" + (f" ({wall_s:.0f} s here)" if wall_s else ""), ""]
    if not (folder / "table.md").is_file():
        return "\n".join([*lines, "_Not run yet._", ""])
    lines += [(folder / "table.md").read_text().strip(), ""]
    for figure in json.loads((folder / "figures.json").read_text()):
        lines += [f"![{Path(figure).stem.replace('_', ' ')}](results/{name}/{figure})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated script names (default: all)")
    parser.add_argument("--skip-run", action="store_true", help="rebuild the README section from the folders as they are")
    args, passthrough = parser.parse_known_args(argv)
    only = set(args.only.split(",")) if args.only else {name for _, name in SCRIPTS}
    unknown = only - {name for _, name in SCRIPTS}
    if unknown:
        raise SystemExit(f"error: unknown ablation {sorted(unknown)[0]!r}; known: {', '.join(n for _, n in SCRIPTS)}")
    from moepic.experiments.ablation import main as run_ablation
    from moepic.outputs import make_folder, write_text_atomic

    walls = json.loads((RESULTS / "wall_s.json").read_text()) if (RESULTS / "wall_s.json").is_file() else {}
    for _, name in SCRIPTS:
        if name in only and not args.skip_run:
            print(f"\n== ablate_{name}.py", file=sys.stderr)
            start = time.perf_counter()
            run_ablation(load(name).ABLATION, HERE / "configs" / "base.yaml", ["--out", str(RESULTS / name), *passthrough],
                         default_out=RESULTS / name)
            walls[name] = time.perf_counter() - start
    make_folder(RESULTS, "results folder")
    write_text_atomic(RESULTS / "wall_s.json", "run times", json.dumps(walls, indent=1) + "\n")
    body = "\n".join(section(letter, name, walls.get(name)) for letter, name in SCRIPTS)
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {README} lacks the {BEGIN} … {END} markers")
    head, rest = text.split(BEGIN, 1)
    write_text_atomic(README, "README", head + BEGIN + "\n" + body + "\n" + END + rest.split(END, 1)[1])
    print(f"rewrote the ablations section of {README}", file=sys.stderr)


if __name__ == "__main__":
    from moepic.errors import MoepicError

    try:
        main()
    except MoepicError as e:  # a full disk or a read-only README: one line, as the ablations say it
        raise SystemExit(f"error: {e}") from None
