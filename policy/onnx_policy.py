"""The TMO policy at run time: an ONNX file checked against the observation layout, run by onnxruntime.

Everything about the file is checked before it is used: it loads, its metadata names the layout version,
K, Z and sizes this daemon builds, and its inputs and outputs have the expected names and shapes. Any
mismatch is a PolicyError naming the file and the problem; the router then decides with MESS+ alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from locod.errors import PolicyError
from locod.policy.observation import LAYOUT_VERSION, N_ACTIONS, OBS_DIM, K, Z

DEFAULT_POLICY = Path(__file__).resolve().parent / "default" / "policy.onnx"


class OnnxPolicy:
    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise PolicyError(f"policy file {path} not found", code="policy_missing")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a 10 us graph: threads would cost more than they save
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for every kind of bad file
            raise PolicyError(
                f"policy file {path} is not a loadable ONNX model: {exc}", code="policy_corrupt"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        expected = {
            "locod.layout_version": str(LAYOUT_VERSION),
            "locod.k": str(K),
            "locod.z": str(Z),
            "locod.obs_dim": str(OBS_DIM),
            "locod.n_actions": str(N_ACTIONS),
        }
        for key, want in expected.items():
            if meta.get(key) != want:
                raise PolicyError(
                    f"policy file {path}: metadata {key} is {meta.get(key)!r}, this daemon needs {want!r}",
                    code="policy_mismatch",
                )
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if (
            set(inputs) != {"observation", "mask"}
            or inputs["observation"][-1] != OBS_DIM
            or inputs["mask"][-1] != N_ACTIONS
            or outputs.get("log_probs", [None])[-1] != N_ACTIONS
        ):
            raise PolicyError(
                f"policy file {path}: inputs {inputs} and outputs {outputs} do not match "
                f"observation[{OBS_DIM}], mask[{N_ACTIONS}] -> log_probs[{N_ACTIONS}]",
                code="policy_mismatch",
            )
        self.version = meta.get("locod.policy_version", "unversioned")
        self._outputs = ["log_probs"]
        self.metadata = dict(meta)

    def log_probs(self, observation: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {
            "observation": np.asarray(observation, dtype=np.float32).reshape(1, OBS_DIM),
            "mask": np.asarray(mask, dtype=np.float32).reshape(1, N_ACTIONS),
        }
        out = self.session.run(self._outputs, feeds)[0]
        result = np.asarray(out[0], dtype=np.float64)
        if not np.isfinite(result[mask > 0]).all():
            raise PolicyError(f"policy {self.version} returned non-finite log-probabilities", code="policy_output")
        return result
