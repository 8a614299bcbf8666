"""The stages of a run, one module per kind, each holding what its fingerprint covers, its checks and its run:

    data -> rope -> stages: (pretrain | sft | merge)... -> eval (base, final) -> report

`plan_recipe` turns a recipe into a RunPlan (the values derived from it once, and the stages in order);
`longforge.runner.execute` runs a plan: every stage's checks first, then each stage, skipping finished ones and
resuming interrupted ones inside a run folder. The stage commands build a plan of one stage and run it the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from longforge.registry import Registry
from longforge.stages import data, merge, pretrain, report, rope, sft
from longforge.stages import eval as eval_stage
from longforge.stages.base import Checkpoint, RunPlan, Stage, StageKind, fingerprint
from longforge.stages.data import DataStage
from longforge.stages.eval import EvalStage
from longforge.stages.listed import ListedStage
from longforge.stages.merge import MergeStage
from longforge.stages.pretrain import PretrainStage
from longforge.stages.report import ReportStage
from longforge.stages.rope import RopeStage
from longforge.stages.sft import SFTStage

if TYPE_CHECKING:
    from longforge.config import Recipe

__all__ = ["STAGES", "Checkpoint", "DataStage", "EvalStage", "MergeStage", "PretrainStage", "ReportStage", "RopeStage",
           "RunPlan", "SFTStage", "Stage", "StageKind", "builds_data", "fingerprint", "plan_recipe"]

# Every stage kind, in the order of the flow; the kinds of the recipe's `stages:` list are also its schema's
# (config.STAGE_SPECS), and plan_recipe builds those through this registry.
STAGES: Registry[StageKind] = Registry("stage kind", [m.KIND for m in (data, rope, pretrain, sft, merge, eval_stage, report)])


def builds_data(recipe: Recipe) -> bool:
    """Whether the run has a data stage (some pretrain stage trains on the run's own data)."""
    return any(st.kind == "pretrain" and st.data is None for st in recipe.stages)


def in_run(run_dir: Path, *parts: str) -> Path:
    """A folder of the run: names from the recipe were validated, and this keeps every write inside the run folder."""
    from longforge.errors import LongforgeError
    from longforge.files import is_inside

    folder = Path(run_dir).joinpath(*parts)
    if not is_inside(folder, run_dir):
        raise LongforgeError(f"{'/'.join(parts)} would lie outside the run folder {run_dir}; rename it.")
    return folder


def plan_recipe(recipe: Recipe, run_dir: Path) -> RunPlan:
    """The plan of `longforge run`: the recipe's derived values and its stages, each with its folder in `run_dir`.

    Nothing is read here; `original_length` is filled by the runner's checks (it reads the model's config).
    """
    run_dir = Path(run_dir)
    plan = RunPlan(base_model=recipe.model.path, target_length=recipe.target_length,
                   seq_len=recipe.data.seq_len or recipe.target_length,
                   tokenizer=recipe.data.tokenizer or recipe.model.path, device=recipe.device, seed=recipe.seed,
                   transform=recipe.positions.transform, trust_remote_code=recipe.model.trust_remote_code,
                   run_dir=run_dir)
    # Every stage of the list has covered the data stage's fingerprint, built or not (listed.recipe_parts).
    data_stage = DataStage(recipe.data, in_run(run_dir, "data"))
    if builds_data(recipe):
        plan.stages.append(data_stage)
    rope_stage = RopeStage(recipe.positions, Checkpoint(recipe.model.path), in_run(run_dir, "rope"))
    plan.stages.append(rope_stage)
    model = rope_stage.checkpoint()
    for spec in recipe.stages:
        folder = in_run(run_dir, "train", spec.name)
        cls = STAGES[spec.kind].stage
        assert issubclass(cls, ListedStage), f"stage kind {spec.kind} is not one of the recipe's list"
        stage = cls.in_recipe(spec, model, folder, data_stage)
        plan.stages.append(stage)
        model = stage.checkpoint()
    models = {"base": Checkpoint(recipe.model.path), "final": model}
    for label in recipe.eval.models:
        plan.stages.append(EvalStage(recipe.eval, models[label], label, in_run(run_dir, "eval", label)))
    if recipe.eval.models:
        plan.stages.append(ReportStage(run_dir))
    return plan


def final_model(plan: RunPlan) -> Path | None:
    """The checkpoint the plan ends with: the last stage's that writes one."""
    made = [s.output for s in plan.stages if isinstance(s, (RopeStage, ListedStage))]
    return made[-1] if made else None
