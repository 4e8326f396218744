"""rayanom: image anomaly detection (DFKDE, DFM, RKDE) as a distributed batch job on Ray.

The public API, imported lazily (``import rayanom`` loads neither torch nor Ray, so the decode workers stay light):

    import rayanom

    config = rayanom.DfkdeConfig()
    run = rayanom.start_ray(config)                       # fit and score never start Ray; the jobs call this
    index = rayanom.describe_index("s3://bucket/index.parquet")      # URIs or local paths, everywhere
    weights = rayanom.resolve_weights(config, None, pretrained=True)[1]
    result = rayanom.fit(index, config, weights, run)
    result.artifact.save("s3://bucket/models/m1")
    model = rayanom.Artifact.load("s3://bucket/models/m1")
    rayanom.score_and_decide(index, model, "s3://bucket/scores/run1", run, "s3://bucket/models/m1")  # as score.py
    rayanom.decide_scores("s3://bucket/scores/run1", 12.5)            # a new threshold, without scoring again
    rayanom.evaluate("s3://bucket/scores/run1", "s3://bucket/scores/run1-report")   # no Ray needed
"""

import importlib

__version__ = "0.1.0"

# name -> module: what ``from rayanom import name`` gives, imported on first use (PEP 562)
_API = {
    "fit": "rayanom.workflows", "score": "rayanom.workflows", "FitResult": "rayanom.workflows",
    "Artifact": "rayanom.artifact",
    "DfkdeConfig": "rayanom.config", "DfmConfig": "rayanom.config", "RkdeConfig": "rayanom.config",
    "RunConfig": "rayanom.config", "UserError": "rayanom.config", "start_ray": "rayanom.launch",
    "describe_index": "rayanom.index", "resolve_weights": "rayanom.features",
    "evaluate": "rayanom.report", "compare_runs": "rayanom.compare", "Threshold": "rayanom.decisions",
    "score_and_decide": "rayanom.workflows", "decide_scores": "rayanom.workflows",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    msg = f"module 'rayanom' has no attribute {name!r}"
    raise AttributeError(msg)
