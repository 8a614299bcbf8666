"""The report stage: report.md, report.html and plots from a run's (or one `longforge eval` folder's) results.

Entry: `ReportStage.run` (longforge.report.build.build_report); `longforge run` ends with it (rebuilt every run: it
is cheap and shows every stage's timing), `longforge report` runs it alone. Writes report/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from longforge.progress import console, say
from longforge.stages.base import RunPlan, Stage, StageKind


@dataclass
class ReportStage(Stage):
    """Build the report of the results under `run_dir` into run_dir/report."""

    kind: ClassVar[str] = "report"
    cached: ClassVar[bool] = False
    run_dir: Path
    title: str = "report"

    @property
    def folder(self) -> Path:  # type: ignore[override]
        return Path(self.run_dir) / "report"

    def covers(self, plan: RunPlan) -> list[Any]:
        return []  # never skipped

    def run(self, plan: RunPlan) -> dict[str, Any]:
        from longforge.files import claim_dir
        from longforge.report.build import build_report, collect, rich_tables
        from longforge.runner import old_report_folder

        info = collect(self.run_dir)  # no results: one sentence, and no report folder
        claim_dir(self.folder, "report folder", ours=old_report_folder)
        paths = build_report(self.run_dir)
        for table in rich_tables(info):
            console.print(table)
        say(f"report: {paths['md']}  and  {paths['html']}")
        return {"md": str(paths["md"]), "html": str(paths["html"])}


KIND = StageKind("report", ReportStage, "report", "report.md and report.html with plots")
