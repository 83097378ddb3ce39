"""What each `segflow` command costs before it does anything: the interpreter and its imports.

    python benchmarks/import_time.py [--src DIR] [--out FILE]

For each command, the import statements it runs (cli.py's own, and those inside the command's function and the
cli.py helpers it calls: read from the AST, so the list follows the code) are run alone with `python -X importtime`;
the figure is the best of three wall times, with the heaviest packages among them (cumulative import time, from the
best run). ``--src`` measures another checkout's src/ folder (e.g. an older commit's, for a before/after) with this
interpreter. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = [["--help"], ["synth"], ["ingest", "from-params"], ["validate"], ["split"], ["cache"], ["teacher"],
            ["train"], ["pseudo-label"], ["evaluate"], ["leaderboard"], ["register"], ["models"],
            ["models", "list"], ["promote"], ["rollback"], ["predict"]]


def command_imports(cli: Path, words: list[str]) -> list[str] | None:
    tree = ast.parse(cli.read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    statements = [ast.unparse(node) for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    if words == ["--help"]:
        return statements
    for function in functions.values():
        for decorator in function.decorator_list:
            if not isinstance(decorator, ast.Call):
                continue
            attr = getattr(decorator.func, "attr", None)
            if attr == "callback" and words == [decorator.func.value.id.removesuffix("_app")]:
                path = words  # `segflow models`: the group's callback lists the architectures
            elif attr == "command":
                name = decorator.args[0].value if decorator.args else function.name.replace("_", "-")
                app = decorator.func.value.id
                path = [name] if app == "app" else [app.removesuffix("_app"), name]
            else:
                continue
            if words == path:
                todo, seen = [function], []
                while todo:
                    current = todo.pop()
                    if current in seen:
                        continue
                    seen.append(current)
                    statements += [ast.unparse(n) for n in ast.walk(current) if isinstance(n, ast.Import | ast.ImportFrom)]
                    todo += [functions[n.func.id] for n in ast.walk(current) if isinstance(n, ast.Call)
                             and isinstance(n.func, ast.Name) and n.func.id in functions]
                return statements
    return None


def heaviest(importtime: str, count: int = 3) -> str:
    """The top-level packages with the largest cumulative import time (segflow's own modules skipped)."""
    totals: dict[str, int] = {}
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        package = name.strip().split(".")[0]
        if package != "segflow":
            totals[package] = max(totals.get(package, 0), int(cumulative))
    top = sorted(totals.items(), key=lambda item: -item[1])[:count]
    return ", ".join(f"{name} {micros / 1e6:.1f}" for name, micros in top if micros > 100_000) or "-"


def measure(code: str, env: dict) -> tuple[float, str]:
    best, best_log = float("inf"), ""
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, capture_output=True,
                              text=True, check=True)
        seconds = time.perf_counter() - started
        if seconds < best:
            best, best_log = seconds, done.stderr
    return best, best_log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.src.resolve())}
    rows = ["| command | seconds | heaviest imports (s, cumulative) |", "|---|---:|---|"]
    for words in COMMANDS:
        statements = command_imports(args.src / "segflow" / "cli.py", words)
        if statements is None:
            rows.append(f"| segflow {' '.join(words)} | (no such command) | |")
            continue
        seconds, log = measure("\n".join(statements), env)
        rows.append(f"| segflow {' '.join(words)} | {seconds:.2f} | {heaviest(log)} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows) + "\n"
    if args.out:
        args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
