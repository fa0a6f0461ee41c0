"""Answers JAHS-Bench-201 surrogate queries as JSON lines on stdin and stdout.

This script runs under the surrogate's own interpreter (Python 3.10 with the `jahs-bench` pins),
not under dehbws: it imports only the standard library and the benchmark package, so dehbws never
shares an environment with scikit-learn 1.0 and xgboost 1.5. Protocol, one JSON object per line:

- first line out: {"ready": true, "module": NAME} or {"ready": false, "error": TEXT}
- in: {"id": N, "config": {...}, "nepochs": E}
- out: {"id": N, "ok": true, "metrics": {"valid-acc": ..., "test-acc": ..., ...}}
  or {"id": N, "ok": false, "error": TEXT}

Anything the benchmark prints goes to stderr, so stdout carries protocol lines only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any, TextIO

# The package was renamed: `jahs_bench` (jahs-bench 1.x) and `jahs_bench_201` (0.x).
MODULE_NAMES = ("jahs_bench", "jahs_bench_201")


def _send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _load_benchmark(args: argparse.Namespace) -> tuple[str, Any]:
    names = [args.module] if args.module else list(MODULE_NAMES)
    errors = []
    for name in names:
        try:
            module = __import__(name)
        except ImportError as error:
            errors.append(f"{name}: {error}")
            continue
        metrics = args.metrics.split(",")
        try:
            benchmark = module.Benchmark(
                task=args.task, download=False, save_dir=args.save_dir, metrics=metrics
            )
        except TypeError:  # releases before 1.1 have no `metrics` argument
            benchmark = module.Benchmark(task=args.task, download=False, save_dir=args.save_dir)
        return name, benchmark
    raise ImportError("no JAHS-Bench-201 package importable (" + "; ".join(errors) + ")")


def _metrics_at(result: dict[Any, Any], nepochs: int) -> dict[str, float]:
    """The metrics of epoch `nepochs` from the benchmark's {epoch: {metric: value}} answer."""
    for key in (nepochs, str(nepochs)):
        if key in result:
            return {str(name): float(value) for name, value in result[key].items()}
    if len(result) == 1:
        (only,) = result.values()
        return {str(name): float(value) for name, value in only.items()}
    raise KeyError(f"the benchmark answered epochs {sorted(result)}, not {nepochs}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--task", default="fashion_mnist")
    parser.add_argument("--metrics", default="valid-acc,test-acc,runtime")
    parser.add_argument("--module", default=None)
    args = parser.parse_args()

    # Keep the real stdout for the protocol; point file descriptor 1 at stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    try:
        name, benchmark = _load_benchmark(args)
    except Exception as error:  # any failure to load is reported, not raised
        traceback.print_exc()
        _send(out, {"ready": False, "error": f"{type(error).__name__}: {error}"})
        return 1
    _send(out, {"ready": True, "module": name})

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            nepochs = int(request["nepochs"])
            result = benchmark(request["config"], nepochs=nepochs)
            _send(out, {"id": request["id"], "ok": True, "metrics": _metrics_at(result, nepochs)})
        except Exception as error:  # a bad query fails that query only
            traceback.print_exc()
            message = f"{type(error).__name__}: {error}"
            _send(out, {"id": request.get("id"), "ok": False, "error": message})
    return 0


if __name__ == "__main__":
    sys.exit(main())
