"""vac: Variable Allocation Compression."""

import logging as _logging

# transformers imports torchao (when installed) whenever it builds a model; torchao's CPU build logs a
# warning for each CUDA-only extension it cannot load, and torch one per Enum torchao registers with
# pytree. Harmless on CPU: kept off stderr.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
