"""Test and demo helpers that ship with the pack (like ``numpy.testing``): tiny random-weight
checkpoints in the official key layouts, so the real loaders, nodes, workflows and the command line
run end to end on a CPU in seconds without any download."""
