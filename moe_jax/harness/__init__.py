"""lm-evaluation-harness adapter: `MoeJaxLM`, registered with lm-eval as model `moe_jax`.

    from moe_jax.harness import MoeJaxLM
    lm = MoeJaxLM.from_pretrained("path/to/checkpoint", plan="plan.json", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])

Needs the `eval` extra (`lm-eval`, `transformers`: requirements-eval.txt). `batching` turns
requests into a few fixed shapes; `lm` holds the model and lm-eval's conventions; `tasks`
loads tasks by name before any model, so bad names and missing data fail first.
"""

from moe_jax.harness.lm import HarnessError, MoeJaxLM, generation_eos_ids
from moe_jax.harness.tasks import load_tasks, scores, simple_evaluate, task_manager

__all__ = ["HarnessError", "MoeJaxLM", "generation_eos_ids", "load_tasks", "scores", "simple_evaluate",
           "task_manager"]
