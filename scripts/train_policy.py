#!/usr/bin/env python3
"""Train the default TMO policy from committed inputs (the simulator and policy/data/bigbench_trace.jsonl),
export it to ONNX (--out, default ./policy.onnx: never over the shipped one unasked) and check it against
torch. `locod policy train` is the same, writing to the state directory's policy.onnx by default. The
shipped policy was made with `--out policy/default/policy.onnx`.

    pip install '.[train]'
    python scripts/train_policy.py [--steps 200000] [--seed 0] [--from-db ~/.local/state/locod/locod.db] [--out F]
"""

import sys

from locod.policy.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
