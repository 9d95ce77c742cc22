"""PyTorch program to int8 LiteRT (``.tflite``): the conversion, runnable on its own.

``python util/deploy/mcu/litert_worker.py --program P.pt2 --calib X.npy --out DIR`` loads a
``torch.export`` program (the classifier, band standardisation included), converts it
with ``litert-torch`` to a float ``.tflite``, quantises that with ``ai-edge-quantizer``'s
static int8 recipe (int8 weights and activations, each tensor's range the min/max over the
clips in ``X.npy``),
and writes ``model.fp32.tflite``, ``model.int8.tflite`` and ``convert.json`` (the operators
of each file, the stage that failed and why). It imports nothing from this repository, so
it runs in an environment that has only ``torch``, ``numpy`` and ``litert-torch``: the
conversion toolchain can live in its own virtual environment
(:func:`util.deploy.mcu.convert.to_tflite` calls it there) when it cannot share the
project's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

#: The file this worker writes its result into (inside --out).
RESULT_NAME = "convert.json"


def _ops(model: bytes) -> dict[str, Any]:
    """Operator counts of a ``.tflite`` and the ones computing in float."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model)
    interp.allocate_tensors()
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    counts: collections.Counter[str] = collections.Counter()
    float_ops: collections.Counter[str] = collections.Counter()
    for op in interp._get_ops_details():  # the public API has no operator list
        name = op["op_name"]
        counts[name] += 1
        if name in ("QUANTIZE", "DEQUANTIZE", "DELEGATE"):
            continue
        outs = [tensors[i] for i in op["outputs"] if i in tensors]
        if any(np.dtype(t["dtype"]) == np.float32 for t in outs):
            float_ops[name] += 1
    return {"ops": dict(sorted(counts.items())), "float_ops": dict(sorted(float_ops.items()))}


def convert(program: Path, calib: Path, out: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Convert and quantise, recording each stage in ``result`` (written to convert.json)."""
    import torch

    result["stage"] = "load"
    x = np.load(calib).astype(np.float32)
    module = torch.export.load(str(program)).module()
    sample = (torch.from_numpy(x[:1]),)
    result["stage"] = "litert-torch convert"
    import litert_torch

    with contextlib.redirect_stdout(io.StringIO()):
        edge = litert_torch.convert(module, sample)
    fp32_path = out / "model.fp32.tflite"
    edge.export(str(fp32_path))
    fp32 = fp32_path.read_bytes()
    result["fp32"] = {"path": str(fp32_path), "bytes": len(fp32), **_ops(fp32)}
    result["fp32_max_abs_diff"] = float(
        np.abs(np.asarray(edge(*sample)) - module(*sample).detach().numpy()).max()
    )
    result["stage"] = "ai-edge-quantizer static int8"
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import calibrator, quantizer, recipe
    from ai_edge_quantizer.utils import qsv_utils

    signature = Interpreter(model_content=fp32).get_signature_list()
    key = next(iter(signature))
    name = signature[key]["inputs"][0]
    q = quantizer.Quantizer(fp32, recipe.static_wi8_ai8())
    # Quantizer.calibrate keeps a moving average of each clip's min/max, which clips the
    # logits of confident clips (measured: 87-90 % agreement on TinyCNN); the global min/max
    # over all calibration clips (ONNX Runtime's "minmax", used by util.deploy) keeps them.
    calib = calibrator.Calibrator(fp32, qsv_update_func=qsv_utils.min_max_update)
    with contextlib.redirect_stdout(io.StringIO()):
        calib.calibrate({key: [{name: x[i : i + 1]} for i in range(len(x))]}, q._recipe_manager)
        calibration = calib.get_model_qsvs()
        quantized = bytes(q.quantize(calibration).quantized_model)
    int8_path = out / "model.int8.tflite"
    int8_path.write_bytes(quantized)
    result["int8"] = {"path": str(int8_path), "bytes": len(quantized), **_ops(quantized)}
    result["calibration_clips"] = int(len(x))
    result["stage"] = "done"
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; 0 when both files are written, 1 otherwise (see convert.json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--program", type=Path, required=True, help="torch.export .pt2 file")
    parser.add_argument("--calib", type=Path, required=True, help="calibration inputs, .npy")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"stage": "start"}
    status = 0
    try:
        convert(args.program, args.calib, args.out, result)
    except Exception as err:  # the caller reads the stage and the message
        result["error"] = f"{type(err).__name__}: {err}".strip().splitlines()[0][:500]
        result["traceback"] = traceback.format_exc()[-4000:]
        status = 1
    (args.out / RESULT_NAME).write_text(json.dumps(result, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
