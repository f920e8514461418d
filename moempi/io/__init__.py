"""File formats and configuration: the HDF5 model, tokens and output files, the run and
topology TOML, JSON readers (docs/design.md §2)."""
