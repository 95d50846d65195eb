"""The chaid lab: what we run to build, train, evaluate and compare chaid, beside the product.

The Shapes world (procedural videos, prompts, judge, training), the evaluation suites, every
benchmark and report, the baselines kept only for comparison, the GPU checks and the demo's
driver. The lab imports the product (``chaid``); the product never imports the lab.
"""

__version__ = "0.1.0"
