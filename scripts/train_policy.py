#!/usr/bin/env python3
"""Train the default TMO policy from committed inputs (the simulator and policy/data/bigbench_trace.jsonl),
export policy/default/policy.onnx and check it against torch. Same as `locod policy train`.

    pip install '.[train]'
    python scripts/train_policy.py [--steps 200000] [--seed 0] [--from-db ~/.local/state/locod/locod.db]
"""

import sys

from locod.policy.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
