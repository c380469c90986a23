"""What a .tflite costs on the device side: bytes, gzip, LiteRT latency, agreement.

For each .tflite given (made by kd-quantize) and the float parent SavedModel:
file bytes raw and gzip (the parent: its ``variables/``), LiteRT latency per
image (1 thread, batch 1, median of --repeats calls after 10 warm-up calls,
on the first test image), and top-1 agreement with the parent on the first
--images test images. The parent's own latency is measured on LiteRT too, as
its unquantized float32 conversion (``conversion.convert(path, "none")``), so
the runtime is the same and only the quantization differs.

  python benchmarks/tflite_deployment.py --base_model_path=saved_models/mnist_m1_at_pgd/1 \
      /tmp/m.tflite /tmp/m_float16.tflite
"""

import argparse
import json
import os
import platform

import numpy as np

import keras_defense as kd
from keras_defense.compression import conversion
from keras_defense.compression import measurement
from keras_defense.models import tflite


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("tflite", nargs="+")
  parser.add_argument("--base_model_path", default="saved_models/mnist_m1_at_pgd/1")
  parser.add_argument("--dataset", default="mnist")
  parser.add_argument("--images", type=int, default=1000)
  parser.add_argument("--repeats", type=int, default=500)
  args = parser.parse_args()
  x, _ = kd.load_arrays(args.dataset, "test", limit=args.images)
  parent = kd.load_model(args.base_model_path)
  float_logits = parent.predict(x, batch_size=256, verbose=0)
  variables = measurement.saved_model_variables(args.base_model_path)
  float_bytes = measurement.file_bytes(variables)
  rows = [{"model": f"{args.base_model_path} (variables/; latency: float32 .tflite)",
           "bytes": float_bytes, "gzip_bytes": measurement.gzipped_bytes(variables),
           "latency_ms": 1e3 * measurement.latency_seconds(
               tflite.TFLiteModel(conversion.convert(args.base_model_path, "none")), x[0],
               repeats=args.repeats),
           "agreement": 1.0}]
  for path in args.tflite:
    model = tflite.TFLiteModel(path, num_threads=1)
    rows.append({"model": path, "bytes": os.path.getsize(path),
                 "gzip_bytes": measurement.gzipped_bytes(path),
                 "latency_ms": 1e3 * measurement.latency_seconds(model, x[0],
                                                                 repeats=args.repeats),
                 "agreement": measurement.agreement(float_logits, model(x))})
  print(f"machine {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; {len(x)} test images; latency: 1 thread, batch 1, "
        f"median of {args.repeats}")
  print("| model | bytes | × float | gzip | × float | latency ms/image | top-1 agreement |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['bytes']:,} | {r['bytes'] / float_bytes:.3f} | "
          f"{r['gzip_bytes']:,} | {r['gzip_bytes'] / float_bytes:.3f} | "
          f"{r['latency_ms']:.3f} | {100 * r['agreement']:.1f}% |")
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
