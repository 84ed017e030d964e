"""A detect run, in data-flow order: listing → reading → preprocess → inference →
postprocess → sink → writing; plan checks a run before Ray starts, run.py runs it on Ray."""
