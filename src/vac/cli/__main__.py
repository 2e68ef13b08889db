"""``python -m vac.cli COMMAND ...`` (also under ``torchrun -m vac.cli distill ...``)."""

from . import main

main()
