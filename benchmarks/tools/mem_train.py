"""Memory of one layer (or a ResNet-18) during training, sparse against dense: see
:mod:`sparsekern.bench.memory` (``python -m sparsekern.bench.memory``), which this runs."""

from sparsekern.bench.memory import main

if __name__ == "__main__":
    main()
