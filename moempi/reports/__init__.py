"""Reports on output files for the people who read them: `moempi inspect`
(timings, load, traffic, overlap per layer) and the plots."""
