"""The paper's experiments: drivers, data builders, configs and reports, one folder per section of the paper.

A package tree beside the library, not installed with it: its modules import the installed ``scalebio`` and each
other by their full names (``experiments.gpt2.pipeline``), never the other way round (tests/test_boundary.py).
Run them from the repository root with ``python -m experiments.gpt2.pipeline denoising``, or by their path
(``python experiments/gpt2/pipeline.py denoising``, from any folder; ``scalebio.scripts``).
"""
