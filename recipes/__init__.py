"""Entry points above the libraries: the `karma` CLI, the demo, the ablation study, the baselines run.

Everything here may import every library (`karma`, `training`, `export`, `service`, `bench`);
nothing in a library imports from here.
"""
