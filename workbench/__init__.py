"""OptiMer workbench: a Gradio app (and, later, notebook widgets) over ``optimer_lib``.

    optimer workbench --workdir runs/demo                 # serve http://127.0.0.1:7860
    from workbench import Session, Workspace, SearchSpec  # the UI-agnostic controller (no gradio import)
    s = Session(Workspace("runs/demo"))
    s.apply({"ja": 0.3, "math": 0.2}).metrics
    from workbench.app import build_app                    # gr.Blocks, not launched

Modules: ``workspace`` (workdir, pool description, shared read-only pool), ``session`` (per-browser
controller: tune, search, chat, export), ``searching`` (background search, study storage),
``chatting`` (streaming generation), ``figures`` (plotly), ``app`` + ``tabs/`` (Gradio).
"""

from __future__ import annotations

from workbench.chatting import GenSettings
from workbench.searching import SearchRun, SearchSpec, TrialEvent
from workbench.session import ExportResult, Session, TuneResult
from workbench.workspace import SharedPool, WorkbenchError, Workspace

__all__ = ["ExportResult", "GenSettings", "SearchRun", "SearchSpec", "Session", "SharedPool", "TrialEvent",
           "TuneResult", "WorkbenchError", "Workspace"]
