"""The parts of bench/gpu_check.py, each run as its own process (part.py) with this folder as its script folder;
tests import the pure ones as gpu_parts.<module> with bench/ on sys.path (never this folder: its module names
would shadow installed packages for everything else in the process)."""
