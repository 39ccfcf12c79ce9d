"""Experiments as files: one TOML file with [model], [task] and one table per step.

* :class:`PromptTask` — your own concept: a prompt template, variables and their values, the
  causal mechanism (functions from Python, tables in a file), answers, held-out values.
* :class:`Experiment` — the model, the task and the steps; :meth:`Experiment.validate` checks the
  file and the model's accuracy on the task and returns the plan; :meth:`Experiment.run` executes
  every step and saves results, figures, a report and a manifest with a content hash of every input.
* :func:`register_step` — how a table joins the format (one module per table under ``steps/``).

The command line: ``steerlab explain FILE``, ``steerlab validate FILE``, ``steerlab run FILE``;
``docs/cli.md`` lists every key.
"""

from steerlab.experiment.core import Context, Experiment, Plan, RunResult, Step, StepOutput, register_step, registered_steps
from steerlab.experiment.task import OPS, PromptTask, task_from_table

__all__ = ["Experiment", "PromptTask", "task_from_table", "Plan", "RunResult", "Step", "StepOutput", "Context", "register_step",
           "registered_steps", "OPS"]
