"""hpcexp example experiment: greet, count, and write a result file.

Parameters arrive as --KEY=VALUE arguments (and as HPCEXP_PARAM_KEY variables).
The result goes to the artifacts folder: $HPCEXP_RESULTS when run by hpcexp,
else ./results.
"""

import argparse
import json
import os
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--greeting", default="hello")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to wait between lines")
    parser.add_argument("--exit-code", type=int, default=0, help="exit with this code (to test failures)")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"ignoring unknown arguments: {unknown}", file=sys.stderr)

    lines = []
    for i in range(args.count):
        line = f"{args.greeting} #{i + 1}"
        print(line, flush=True)
        lines.append(line)
        if args.sleep:
            time.sleep(args.sleep)

    results = os.environ.get("HPCEXP_RESULTS", "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "result.json"), "w") as fh:
        json.dump({"greeting": args.greeting, "count": args.count, "lines": lines,
                   "run_id": os.environ.get("HPCEXP_RUN_ID")}, fh, indent=2)
    print(f"wrote {os.path.join(results, 'result.json')}", file=sys.stderr)
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
