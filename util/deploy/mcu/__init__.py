"""Shipping a classifier to a microcontroller: int8 LiteRT, measured, with a CMSIS-DSP front end.

``python -m util.deploy.mcu --ckpt_path <ckpt> --out DIR`` writes the device bundle
(:mod:`~util.deploy.mcu.bundle`). One job a module:

- :mod:`~util.deploy.mcu.convert`: PyTorch to int8 ``.tflite`` (through
  :mod:`~util.deploy.mcu.litert_worker`, which may run in its own environment);
- :mod:`~util.deploy.mcu.measure`: TensorFlow Lite Micro's arena and runs, vela's estimate;
- :mod:`~util.deploy.mcu.frontend`: the log-mel front end in CMSIS-DSP (f32, q31, q15);
- :mod:`~util.deploy.mcu.c_array`: C arrays and headers;
- :mod:`~util.deploy.mcu.report`: the manifest as table rows;
- ``__main__``: the command line.

Nothing is imported here, so ``import util.deploy.mcu.frontend`` needs only ``cmsisdsp``.
"""
