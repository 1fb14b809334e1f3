"""The memorization benchmark: the paper's controlled setting, runs, metrics, report and plots.

``hf-memsinks run configs/demo.yaml`` is the entry point (see :mod:`.runner`).
"""
