"""The tables of an experiment file, one module each.

Every module here is imported by :func:`steerlab.experiment.steps` and adds its table with one
:func:`~steerlab.experiment.register_step` call; a new table is a new module in this folder.
"""
