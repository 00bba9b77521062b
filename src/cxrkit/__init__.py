"""cxrkit: chest X-ray classification from data to a deployable model.

The entry points, each with its docstring (`help(...)`):

    from cxrkit.config import TrainConfig        # TrainConfig.preset("quick", data=...)
    from cxrkit.training import train            # -> the run folder
    from cxrkit.evaluation import evaluate_run, summary
    from cxrkit.predict import predict, Predictor
    from cxrkit.explain import gradcam, overlay
    from cxrkit.export import export_model
    from cxrkit.compare import compare_runs
    from cxrkit.adapt import adapt_run
    from cxrkit.report import build_report
    from cxrkit.pipeline import run_pipeline     # all of it, as `cxr run`
    from cxrkit.data.audit import audit_dataset

Each module imports PyTorch only when it needs it.
"""

__version__ = "0.1.0"
