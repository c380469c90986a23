"""keras-defense: pruning + logits augmentation against adversarial examples, measured honestly."""

import setuptools

# A set verified together in a fresh venv (pip check clean): see BUILD.md.
INSTALL_REQUIRES = [
    "tensorflow==2.21.0",
    "tf-keras==2.21.0",
    "tensorflow-model-optimization==0.8.1",
    "tensorflow-datasets==4.9.10",
    "importlib_resources>=6",  # tfds 4.9.x needs it and does not declare it
    "absl-py>=1.4,<3",
    "numpy>=1.26,<3",
    "matplotlib>=3.8",
    "tensorboard==2.21.0",
    # LiteRT, TensorFlow's maintained TFLite runtime: runs kd-quantize's .tflite files
    # (models/tflite.py) without TensorFlow; 2.3.0 works with numpy 2.x (pip check clean).
    "ai-edge-litert==2.3.0",
]

setuptools.setup(
    name="keras-defense",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["keras_defense", "keras_defense.*"]),
    package_data={"keras_defense": ["data_files/mnist/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8", "pytest-xdist==3.8.0",
                             "import-linter==2.16"]},  # lint-imports: the layers (.importlinter)
    entry_points={
        "console_scripts": [
            "kd-train=keras_defense.bin.train:run_main",
            "kd-prune=keras_defense.bin.prune:run_main",
            "kd-augment=keras_defense.bin.augment:run_main",
            "kd-experiment=keras_defense.bin.experiment:run_main",
            "kd-evaluate=keras_defense.bin.evaluate:run_main",
            "kd-sweep=keras_defense.bin.sweep:run_main",
            "kd-quantize=keras_defense.bin.quantize:run_main",
            "kd-certify=keras_defense.bin.certify:run_main",
        ],
    },
)
