"""The lab built on the ConStruct library: synthetic data, the testbed towers, the demo, the
ablation, benchmarks, the GPU check and the config reference.

It runs from a clone (``python -m construct_lab.<tool>``) and is not part of the installed wheel.
The library (``construct``) never imports from here.
"""
