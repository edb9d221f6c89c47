"""Everything learned: the MESS+ router (online) and the TMO offloading policy (trained, shipped as ONNX)."""
