"""The model's math: shapes and presets, RMSNorm, gating, the expert MLP, the layer
stack's arrays, the load-balancing bias.  Written against an array module ``xp``;
imports no MPI, no runtime, no files."""
