"""vac: Variable Allocation Compression."""
