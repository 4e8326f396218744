"""rayanom: image anomaly detection (DFKDE) as a distributed batch job on Ray."""

__version__ = "0.1.0"
