"""sparsearch.report: a study's results as tables, PNG plots, a self-contained HTML page, CSV and JSON,
computed from the results store alone."""

from sparsearch.report.methods import MethodComparison, compare_methods
from sparsearch.report.render import (
    Report,
    ReportFiles,
    default_report_folder,
    rich_comparison,
    rich_methods,
    rich_table,
    write_report,
)
from sparsearch.report.summary import (
    SPARSITY_DEFINITION,
    ArmSummary,
    SearchComparison,
    StudyResults,
    compare_search_with_random,
    load_results,
    space_notes,
    summarize,
)

__all__ = [
    "SPARSITY_DEFINITION",
    "ArmSummary",
    "MethodComparison",
    "Report",
    "ReportFiles",
    "SearchComparison",
    "StudyResults",
    "compare_methods",
    "compare_search_with_random",
    "default_report_folder",
    "load_results",
    "rich_comparison",
    "rich_methods",
    "rich_table",
    "space_notes",
    "summarize",
    "write_report",
]
