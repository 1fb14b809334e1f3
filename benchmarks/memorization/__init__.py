"""The memorization benchmark: the paper's controlled setting, runs, metrics, report and plots.

Outside the library (it imports ``hf_memsinks``, never the other way): ``python -m
benchmarks.memorization run configs/demo.yaml`` is the entry point (:mod:`.cli`, :mod:`.runner`).
"""
