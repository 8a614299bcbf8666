"""RULER (Hsieh et al. 2024): the synthetic tasks with RULER's templates, parameters and metrics, plus QA on user files.

tasks.py names the tasks (family, parameters, metric, budget, data needed), templates.py holds RULER's text,
generators.py makes samples, qa.py reads SQuAD and HotpotQA, scoring.py scores and summarizes, run.py fits prompts
to lengths and runs a model.
"""

from longforge.eval.ruler.generators import (DEPTHS, Resources, RulerSample, cwe_sample, fwe_sample, make_sample,
                                             niah_sample, qa_sample, vt_sample, zeta)
from longforge.eval.ruler.qa import QAData, load_hotpotqa, load_squad
from longforge.eval.ruler.run import (EVAL_TASK, build_task, check_tasks, haystack_of, max_units, needed, ruler_lengths,
                                      run_ruler)
from longforge.eval.ruler.scoring import THRESHOLD, answer_done, effective_length, score, summarize
from longforge.eval.ruler.tasks import SYNTHETIC, TASKS, TaskDef

__all__ = ["DEPTHS", "EVAL_TASK", "SYNTHETIC", "TASKS", "THRESHOLD", "QAData", "Resources", "RulerSample", "TaskDef", "answer_done",
           "build_task", "check_tasks", "cwe_sample", "effective_length", "fwe_sample", "haystack_of", "load_hotpotqa",
           "load_squad", "make_sample", "max_units", "needed", "niah_sample", "qa_sample", "ruler_lengths", "run_ruler",
           "score", "summarize", "vt_sample", "zeta"]
