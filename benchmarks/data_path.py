"""Data-path benchmark: the tensor-resident pipeline against a conventional PIL/torchvision one.

    .venv/bin/python benchmarks/data_path.py                    # digits (embedded), a few minutes on 2 CPU cores
    .venv/bin/python benchmarks/data_path.py --synthetic 50000  # CIFAR-sized random data, no download
    .venv/bin/python benchmarks/data_path.py --help

The same as `bdlab bench`; the measurements live in `trials/bench.py`.
"""

from trials.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
