"""Applications built on the library: demo, ablation, benchmarks, GPU check, testbed, config reference.

The library packages (config, data, models, losses, inference, engine) never import from here.
"""
