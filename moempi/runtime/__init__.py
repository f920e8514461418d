"""The distributed runtime: rank layout and collective checks, array backends (numpy,
CuPy, the stand-in), token dispatch, the micro-batch scheduler, weight loading,
checkpoints, the `moempi run` job."""
