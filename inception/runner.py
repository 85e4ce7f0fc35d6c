"""Generic Triton Python-backend model that runs a TorchScript `model.pt` beside it.

The embedded CPU stack uses it because the tritonserver inside the `nvidia-pytriton`
wheel has no libtorch backend. It is copied as `<model>/1/model.py` by the repository
writer and reads everything from the model's config: input and output names (passed to
the module positionally, in config order), and the `precision` parameter. It honours the
instance group: a KIND_GPU instance runs on that GPU, so the same flavour measures a GPU.

Triton hands `execute` every request of a dynamic batch; they are concatenated into one
forward pass and split back, and a failure answers each request with an error instead of
taking the model down.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

# The stub's embedded interpreter ignores PYTHONPATH and starts with its base Python's
# site-packages; the launcher passes the serving environment's there. They go first, so
# that numpy and torch come from that environment and not from the base interpreter (a
# foreign numpy makes the backend send empty outputs).
for _path in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
    if _path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
import torch.utils.dlpack  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by the Python backend)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{int(args.get('model_instance_device_id', 0))}")
        else:
            self.device = torch.device("cpu")
        path = os.path.join(args["model_repository"], args["model_version"], "model.pt")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(TorchScript|torch\.jit).*deprecated")
            module = torch.jit.load(path, map_location=self.device)
        module.eval()
        self.half = params.get("precision", "fp32") == "fp16" and self.device.type == "cuda"
        if self.half:
            module.half()
        self.module = module
        self.logger = pb_utils.Logger
        self.logger.log_info(f"{config['name']}: loaded {path} on {self.device}, half={self.half}")

    def _forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            out = self.module(*[t.to(self.device, non_blocking=True) for t in inputs])
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.float().cpu() for o in outputs]

    def execute(self, requests: list) -> list:
        # Tensors cross the backend boundary through DLPack, not numpy: no copy on the
        # way in, and no dependence on which numpy the stub's interpreter found.
        try:
            per_request = [
                [
                    torch.from_dlpack(pb_utils.get_input_tensor_by_name(r, name).to_dlpack())
                    for name in self.input_names
                ]
                for r in requests
            ]
            sizes = [tensors[0].shape[0] for tensors in per_request]
            batched = [
                torch.cat([tensors[i] for tensors in per_request]) for i in range(len(self.input_names))
            ]
            outputs = self._forward(batched)
        except Exception as exc:  # answer every request rather than crash the stub
            error = pb_utils.TritonError(f"inference failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        for i, size in enumerate(sizes):
            start = sum(sizes[:i])
            tensors = [
                pb_utils.Tensor.from_dlpack(
                    name, torch.utils.dlpack.to_dlpack(out[start : start + size].clone())
                )
                for name, out in zip(self.output_names, outputs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        self.module = None
