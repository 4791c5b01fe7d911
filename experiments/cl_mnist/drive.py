"""Run queued CLI invocations in one process: each line is ``OUTPUT_DIR FLAG...`` and runs exactly
``python -m sparsekern_cl COMMON_FLAGS --output-dir OUTPUT_DIR FLAG...`` through the CLI's own
entry point (``sparsekern_cl.cli.main``), skipping runs whose results.json exists.  One process
saves the ~2 s (10 s on a busy machine) of start-up per run; every run seeds itself, so the
results are those of separate processes."""

import os
import shlex
import sys

from sparsekern_cl.cli import main

common = shlex.split(os.environ["COMMON"])
with open(sys.argv[1]) as f:
    lines = [ln.split() for ln in f if ln.strip()]
for i, (out, *flags) in enumerate(lines):
    if os.path.isfile(os.path.join(out, "results.json")):
        continue
    print(
        f"[{i + 1}/{len(lines)}] python -m sparsekern_cl {' '.join(common)} --output-dir {out} {' '.join(flags)}",
        flush=True,
    )
    rc = main(common + ["--output-dir", out] + flags)
    if rc:
        sys.exit(rc)
